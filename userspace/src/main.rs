fn main() {
    let mut ebpf = aya::Ebpf::load(rampart::bpf::FIREWALL_OBJ).expect("load obj");
    let prog: &mut aya::programs::Xdp = ebpf.program_mut("rampart_fw").unwrap().try_into().unwrap();
    match prog.load() {
        Ok(()) => println!("loaded OK"),
        Err(e) => { println!("ERR {e}"); if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &e { let s = verifier_log.to_string(); let n = s.len(); println!("{}", &s[n.saturating_sub(3000)..]); } }
    }
}
