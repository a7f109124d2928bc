//! `tg-probe`: the pod side of the data path tests. Runs inside a pod (its network
//! namespace and container cgroup) and connects the way a client in the pod would.
//!
//! ```text
//! tg-probe connect ADDR [--nonblock] [--tfo DATA] [--send DATA] [--mark N] [--timeout-ms N]
//!     one connection; prints one JSON line:
//!     {"ok":true,"peer":"<getpeername>","local":"<getsockname>"} or {"ok":false,"error":".."}
//! tg-probe loop ADDR --until-file PATH [--max-secs N] [--max-count N] [--timeout-ms N]
//!     connects again and again (each closed at once) until PATH exists or a bound is hit;
//!     prints {"attempts":N,"connected":N,"failed":N,"first_error":".."}
//! ```
//!
//! Addresses: `10.96.0.1:443` uses an AF_INET socket; `[::ffff:10.96.0.1]:443` and
//! `[fd77::10]:6443` an AF_INET6 one.

use std::io::{ErrorKind, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

struct Options {
    addr: SocketAddr,
    nonblock: bool,
    tfo: Option<String>,
    send: Option<String>,
    mark: Option<u32>,
    timeout: Duration,
    until_file: Option<PathBuf>,
    max_secs: u64,
    max_count: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, opts) = match parse(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tg-probe: {e}");
            std::process::exit(2);
        }
    };
    let line = match mode.as_str() {
        "connect" => match connect_once(&opts) {
            Ok((sock, peer, local)) => {
                if let Some(data) = &opts.send {
                    let _ = (&sock).write_all(data.as_bytes());
                }
                serde_json::json!({"ok": true, "peer": peer.to_string(), "local": local.to_string()})
            }
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        },
        "loop" => run_loop(&opts),
        other => {
            eprintln!("tg-probe: unknown mode {other:?}");
            std::process::exit(2);
        }
    };
    println!("{line}");
}

fn parse(args: &[String]) -> Result<(String, Options), String> {
    let mode = args
        .first()
        .ok_or("usage: tg-probe connect|loop ADDR ...")?;
    let addr: SocketAddr = args
        .get(1)
        .ok_or("missing ADDR")?
        .parse()
        .map_err(|e| format!("bad ADDR: {e}"))?;
    let mut o = Options {
        addr,
        nonblock: false,
        tfo: None,
        send: None,
        mark: None,
        timeout: Duration::from_millis(2000),
        until_file: None,
        max_secs: 30,
        max_count: 100_000,
    };
    let mut it = args[2..].iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--nonblock" => o.nonblock = true,
            "--tfo" => o.tfo = Some(value()?),
            "--send" => o.send = Some(value()?),
            "--mark" => o.mark = Some(value()?.parse().map_err(|e| format!("--mark: {e}"))?),
            "--timeout-ms" => {
                o.timeout = Duration::from_millis(value()?.parse().map_err(|e| format!("{e}"))?)
            }
            "--until-file" => o.until_file = Some(PathBuf::from(value()?)),
            "--max-secs" => o.max_secs = value()?.parse().map_err(|e| format!("{e}"))?,
            "--max-count" => o.max_count = value()?.parse().map_err(|e| format!("{e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok((mode.clone(), o))
}

/// One connection as the options say; returns the socket, getpeername and getsockname.
fn connect_once(o: &Options) -> Result<(Socket, SocketAddr, SocketAddr), String> {
    let domain = if o.addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    if let Some(mark) = o.mark {
        sock.set_mark(mark).map_err(|e| format!("SO_MARK: {e}"))?;
    }
    let target = SockAddr::from(o.addr);
    if let Some(data) = &o.tfo {
        // TCP Fast Open: the connect happens inside sendto(MSG_FASTOPEN).
        sock.send_to_with_flags(data.as_bytes(), &target, libc::MSG_FASTOPEN)
            .map_err(|e| format!("sendto(MSG_FASTOPEN): {e}"))?;
        // Without a TFO cookie the kernel sends a plain SYN; wait for the handshake so
        // that getpeername reports a connected peer.
        wait_connected(&sock, o.timeout)?;
    } else if o.nonblock {
        sock.set_nonblocking(true)
            .map_err(|e| format!("O_NONBLOCK: {e}"))?;
        match sock.connect(&target) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(format!("connect: {e}")),
        }
        wait_connected(&sock, o.timeout)?;
        sock.set_nonblocking(false)
            .map_err(|e| format!("O_NONBLOCK off: {e}"))?;
    } else {
        sock.connect_timeout(&target, o.timeout)
            .map_err(|e| format!("connect: {e}"))?;
    }
    let peer = sock
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?
        .as_socket()
        .ok_or("getpeername: not an IP address")?;
    let local = sock
        .local_addr()
        .map_err(|e| format!("getsockname: {e}"))?
        .as_socket()
        .ok_or("getsockname: not an IP address")?;
    Ok((sock, peer, local))
}

/// Waits until a connecting socket is writable, then reports its SO_ERROR.
fn wait_connected(sock: &Socket, timeout: Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd array of length 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    if n == 0 {
        return Err("connect: timed out".into());
    }
    if n < 0 {
        return Err(format!("poll: {}", std::io::Error::last_os_error()));
    }
    match sock.take_error() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(format!("connect: {e}")),
        Err(e) => Err(format!("SO_ERROR: {e}")),
    }
}

fn run_loop(o: &Options) -> serde_json::Value {
    let started = Instant::now();
    let deadline = Duration::from_secs(o.max_secs);
    let (mut attempts, mut connected, mut failed) = (0u64, 0u64, 0u64);
    let mut first_error: Option<String> = None;
    while attempts < o.max_count && started.elapsed() < deadline {
        if o.until_file.as_ref().is_some_and(|p| p.exists()) {
            break;
        }
        attempts += 1;
        match connect_once(o) {
            Ok((sock, _, _)) => {
                connected += 1;
                // Wait for the peer to accept and close, so connections do not pile up
                // in the listener's queue; EOF or reset both end it.
                let _ = sock.set_read_timeout(Some(o.timeout));
                let mut buf = [MaybeUninit::<u8>::uninit(); 1];
                match sock.recv(&mut buf) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {}
                }
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    serde_json::json!({
        "attempts": attempts,
        "connected": connected,
        "failed": failed,
        "first_error": first_error,
    })
}
