//! The checksum relay in front of pulsar-lite as a process (see `docs/pulsar.md`):
//! `pulsar_relay <broker host:port>` prints the URL clients connect to (`pulsar://127.0.0.1:<port>`)
//! on its first line and relays until its standard input closes.
//!
//! `cargo xtask test pulsar` and `cargo xtask bench pulsar` run it: xtask cannot link the relay
//! itself, since it is built before it installs the `protoc` the `pulsar` crate's build needs.
//! Tests start a [`Relay`] in process instead.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use tg_testkit::pulsar_relay::Relay;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [broker] = args.as_slice() else {
        eprintln!("usage: pulsar_relay <broker host:port>");
        return ExitCode::FAILURE;
    };
    let broker: SocketAddr = match broker.parse() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("pulsar_relay: {broker:?} is not an address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let relay = match Relay::start(broker) {
        Ok(relay) => relay,
        Err(e) => {
            eprintln!("pulsar_relay: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    if writeln!(out, "{}", relay.url())
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    // whoever started the relay holds our standard input: it ends when they do, however they end
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    drop(relay);
    ExitCode::SUCCESS
}
