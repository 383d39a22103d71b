//! The host's "management network" as neighbours see it: a TCP listener (`--check-listen`) that
//! accepts connections and closes them at once. Its address is every host's `check_addr`; a
//! neighbour asked to `CheckHost` TCP-connects to it.
//!
//! Isolation for tests: while the file `CONTROL_DIR/isolate` exists the listener is closed (connects
//! are refused, as for a host unreachable from its neighbours); when the file is removed it listens
//! again on the same address. The file is looked at every [`ISOLATE_POLL`].

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

/// How often the isolate file is looked at.
pub const ISOLATE_POLL: Duration = Duration::from_millis(100);

/// Timeout of the TCP connect of a `CheckHost`.
pub const CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Name of the isolate file inside the control directory.
pub const ISOLATE_FILE: &str = "isolate";

/// Serve the check listener until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, control_dir: Option<PathBuf>) {
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "check listener has no local address; neighbour checks will fail");
            return;
        }
    };
    let Some(control_dir) = control_dir else {
        loop {
            accept_one(&listener).await;
        }
    };
    let isolate = control_dir.join(ISOLATE_FILE);
    let mut listener = Some(listener);
    let mut rebind_failed = false;
    loop {
        let isolated = tokio::fs::try_exists(&isolate).await.unwrap_or(false);
        if isolated && listener.is_some() {
            listener = None;
            tracing::warn!(%addr, file = %isolate.display(), "isolate file present: check listener closed, host unreachable from its neighbours");
        } else if !isolated && listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    listener = Some(l);
                    rebind_failed = false;
                    tracing::info!(%addr, "isolate file gone: check listener open again");
                }
                Err(e) => {
                    if !rebind_failed {
                        tracing::warn!(%addr, error = %e, "cannot reopen the check listener; retrying");
                    }
                    rebind_failed = true;
                }
            }
        }
        match &listener {
            Some(l) => {
                tokio::select! {
                    () = accept_one(l) => {}
                    () = tokio::time::sleep(ISOLATE_POLL) => {}
                }
            }
            None => tokio::time::sleep(ISOLATE_POLL).await,
        }
    }
}

async fn accept_one(l: &TcpListener) {
    match l.accept().await {
        // Accept and close: the connect succeeding is the whole answer.
        Ok((sock, _)) => drop(sock),
        Err(e) => {
            tracing::debug!(error = %e, "check listener accept failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The address neighbours use: the listener's, with an unspecified IP (`0.0.0.0`, `::`) replaced by
/// the host's own `ip` (the one it reaches the management server from).
pub(crate) fn advertised(listen: SocketAddr, ip: &str) -> String {
    if listen.ip().is_unspecified() {
        match ip.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, listen.port()).to_string(),
            Err(_) => listen.to_string(),
        }
    } else {
        listen.to_string()
    }
}

/// Whether a TCP connect to `addr` succeeds within [`CHECK_CONNECT_TIMEOUT`]. Blocking.
pub(crate) fn reachable(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Some(first) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    TcpStream::connect_timeout(&first, CHECK_CONNECT_TIMEOUT).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address() {
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert_eq!(advertised(any, "10.1.2.3"), "10.1.2.3:4000");
        assert_eq!(advertised(any, "not-an-ip"), "0.0.0.0:4000");
        let lo: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertised(lo, "10.1.2.3"), "127.0.0.1:4000");
        let v6: SocketAddr = "[::]:4000".parse().unwrap();
        assert_eq!(advertised(v6, "fd00::1"), "[fd00::1]:4000");
    }

    #[tokio::test]
    async fn isolate_closes_and_reopens_on_the_same_port() {
        let dir = tempfile::tempdir().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(serve(l, Some(dir.path().to_owned())));
        let probe = |a: String| async move { tokio::task::spawn_blocking(move || reachable(&a)).await.unwrap() };
        assert!(probe(addr.clone()).await);
        std::fs::write(dir.path().join(ISOLATE_FILE), "").unwrap();
        let mut tries = 0;
        while probe(addr.clone()).await {
            tries += 1;
            assert!(tries < 100, "listener still open");
            tokio::time::sleep(ISOLATE_POLL / 4).await;
        }
        std::fs::remove_file(dir.path().join(ISOLATE_FILE)).unwrap();
        let mut tries = 0;
        while !probe(addr.clone()).await {
            tries += 1;
            assert!(tries < 100, "listener not reopened");
            tokio::time::sleep(ISOLATE_POLL / 4).await;
        }
        task.abort();
        assert!(!reachable("no-port"));
    }
}
