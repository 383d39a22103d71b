//! A TCP proxy that tests and benchmarks cut and heal: in front of a database (a partition, a
//! refused port) or of a management server for one agent (a host cut off its management network).

use anyhow::{Context, Result};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// How a [`TcpProxy`] cuts a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Accept new connections and never forward them (a partition: packets go nowhere).
    Blackhole,
    /// Close new connections at once (the host answers, the port is unreachable).
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Cut(Cut),
}

struct ProxyState {
    mode: Mutex<Mode>,
    /// Both ends of every forwarded connection, to sever them.
    live: Mutex<Vec<TcpStream>>,
    /// Blackholed client connections (held open, never answered).
    held: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A TCP proxy on 127.0.0.1 (a free port) forwarding to `upstream` until cut.
pub struct TcpProxy {
    pub port: u16,
    st: Arc<ProxyState>,
}

impl TcpProxy {
    pub fn start(upstream: &str) -> Result<TcpProxy> {
        let l = TcpListener::bind("127.0.0.1:0").context("bind the proxy")?;
        let port = l.local_addr().context("proxy address")?.port();
        let st = Arc::new(ProxyState {
            mode: Mutex::new(Mode::Forward),
            live: Mutex::new(Vec::new()),
            held: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let st2 = st.clone();
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                if st2.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = s else { continue };
                let mode = *lock(&st2.mode);
                match mode {
                    Mode::Cut(Cut::Refuse) => drop(client),
                    Mode::Cut(Cut::Blackhole) => lock(&st2.held).push(client),
                    Mode::Forward => {
                        let Ok(up) = TcpStream::connect(&upstream) else { continue };
                        let _ = client.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let (Ok(c2), Ok(u2)) = (client.try_clone(), up.try_clone()) else { continue };
                        let mut live = lock(&st2.live);
                        live.retain(|s| s.peer_addr().is_ok());
                        for s in [&client, &up] {
                            if let Ok(s) = s.try_clone() {
                                live.push(s);
                            }
                        }
                        drop(live);
                        pump(c2, u2);
                        pump(up, client);
                    }
                }
            }
        });
        Ok(TcpProxy { port, st })
    }

    /// Sever every connection and treat new ones according to `how`.
    pub fn cut(&self, how: Cut) {
        *lock(&self.st.mode) = Mode::Cut(how);
        for s in lock(&self.st.live).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Forward again; connections held during the cut are closed.
    pub fn heal(&self) {
        *lock(&self.st.mode) = Mode::Forward;
        for s in lock(&self.st.held).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.cut(Cut::Refuse);
        self.heal();
    }
}

/// Copy `from` to `to` until either side closes, then close both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
