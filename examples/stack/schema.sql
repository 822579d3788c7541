-- Run once on the first primary (db1), with read_only off there; the replica gets all of it
-- through replication. SHOP_PASSWORD, MONITOR_PASSWORD and REPL_PASSWORD are placeholders that
-- whoever runs this replaces (the demo and the system test generate them per run).
CREATE DATABASE IF NOT EXISTS shop;
CREATE TABLE IF NOT EXISTS shop.notes (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  body VARCHAR(4096) NOT NULL,
  app VARCHAR(64) NOT NULL,
  created TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
);
-- The application, through rampart's MySQL router on each app server.
CREATE USER IF NOT EXISTS 'shop'@'10.1.2.%' IDENTIFIED BY 'SHOP_PASSWORD';
GRANT SELECT, INSERT, UPDATE, DELETE ON shop.* TO 'shop'@'10.1.2.%';
-- rampart's monitor: read_only, replication state and lag.
CREATE USER IF NOT EXISTS 'rampart'@'10.1.2.%' IDENTIFIED BY 'MONITOR_PASSWORD';
GRANT PROCESS, REPLICATION CLIENT, SLAVE MONITOR ON *.* TO 'rampart'@'10.1.2.%';
-- Replication between the two database servers.
CREATE USER IF NOT EXISTS 'repl'@'10.1.3.%' IDENTIFIED BY 'REPL_PASSWORD';
GRANT REPLICATION SLAVE ON *.* TO 'repl'@'10.1.3.%';
