//! The WAN relay of benches/lib/wan_relay.rs as a program (usage there):
//! `cargo run --release --example wan_relay -- --listen 127.0.0.1:18443 --to 127.0.0.2:8443 --delay-ms 25`.

#[path = "../benches/lib/wan_relay.rs"]
mod wan_relay;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(wan_relay::main_with_args(&args));
}
