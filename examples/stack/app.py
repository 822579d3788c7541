#!/usr/bin/python3
"""The stack's application server: a small JSON API over MariaDB, behind rampart.

It knows two MySQL addresses and nothing else about the database tier: rampart's read-write
port (always the current primary) and its read-only port (a healthy replica). Failover is
rampart's business; this program only opens a connection per request, so a session that
rampart closed on a demoted primary costs one failed request, never a stale writer.

    GET  /api/health      200 "ok" (the web tier's and rampart's health checks)
    POST /api/notes       body = the note; INSERT on the primary; 201 {"id", "app", "server_id"}
                          once the write is committed (so an acknowledged write is durable)
    GET  /api/notes/ID    SELECT on a replica; 200 {"id", "body", "app", "server_id"}, or 404
                          (not there yet: replication lag, or no such note)
    GET  /api/whoami      {"app", "rw_server_id", "ro_server_id"}: which servers answer now

Debian's python3 (/usr/bin/python3) and python3-pymysql; no other dependency.
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pymysql

SCHEMA = """CREATE TABLE IF NOT EXISTS notes (
  id BIGINT AUTO_INCREMENT PRIMARY KEY,
  body VARCHAR(4096) NOT NULL,
  app VARCHAR(64) NOT NULL,
  created TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
)"""


def connect(args, port):
    return pymysql.connect(
        host=args.mysql_host,
        port=port,
        user=args.user,
        password=args.password,
        database=args.database,
        autocommit=True,
        connect_timeout=3,
        read_timeout=5,
        write_timeout=5,
    )


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stack-app"

    def log_message(self, fmt, *a):  # one line per error only; the proxies count requests
        pass

    def reply(self, code, obj):
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def failed(self, what, e):
        sys.stderr.write(f"{self.server.args.name}: {what}: {e}\n")
        self.reply(503, {"error": f"{what}: {e}", "app": self.server.args.name})

    def do_GET(self):
        args = self.server.args
        if self.path == "/api/health":
            return self.reply(200, {"status": "ok", "app": args.name})
        if self.path == "/api/whoami":
            try:
                out = {"app": args.name}
                for key, port in (("rw_server_id", args.rw_port), ("ro_server_id", args.ro_port)):
                    with connect(args, port) as c, c.cursor() as cur:
                        cur.execute("SELECT @@server_id")
                        out[key] = cur.fetchone()[0]
                return self.reply(200, out)
            except pymysql.MySQLError as e:
                return self.failed("whoami", e)
        if self.path.startswith("/api/notes/"):
            try:
                note = int(self.path[len("/api/notes/"):])
            except ValueError:
                return self.reply(400, {"error": "note id must be a number"})
            try:
                with connect(args, args.ro_port) as c, c.cursor() as cur:
                    cur.execute("SELECT body, @@server_id FROM notes WHERE id = %s", (note,))
                    row = cur.fetchone()
            except pymysql.MySQLError as e:
                return self.failed("read", e)
            if row is None:
                return self.reply(404, {"error": f"no note {note} (yet)", "app": args.name})
            return self.reply(200, {"id": note, "body": row[0], "app": args.name, "server_id": row[1]})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        args = self.server.args
        if self.path != "/api/notes":
            return self.reply(404, {"error": "not found"})
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        try:
            with connect(args, args.rw_port) as c, c.cursor() as cur:
                cur.execute("INSERT INTO notes (body, app) VALUES (%s, %s)", (body, args.name))
                note = cur.lastrowid
                cur.execute("SELECT @@server_id")
                server = cur.fetchone()[0]
        except pymysql.MySQLError as e:
            return self.failed("write", e)
        self.reply(201, {"id": note, "app": args.name, "server_id": server})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="this server's name, in every answer")
    p.add_argument("--listen", default="127.0.0.1:8000")
    p.add_argument("--mysql-host", default="127.0.0.1")
    p.add_argument("--rw-port", type=int, default=3306)
    p.add_argument("--ro-port", type=int, default=3307)
    p.add_argument("--user", default="shop")
    p.add_argument("--password-file", required=True)
    p.add_argument("--database", default="shop")
    p.add_argument("--create-schema", action="store_true", help="create the table (on the primary) and exit")
    args = p.parse_args()
    with open(args.password_file) as f:
        args.password = f.readline().strip()
    if args.create_schema:
        with connect(args, args.rw_port) as c, c.cursor() as cur:
            cur.execute(SCHEMA)
        return
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    server.args = args
    server.serve_forever()


if __name__ == "__main__":
    main()
