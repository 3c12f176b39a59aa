//! The HTTP listener: accepts TCP connections and serves each with hyper's HTTP/1.1
//! (WebSocket upgrades included) in front of the axum router, with the connection limits
//! `axum::serve` lacks, so that no client can hold the node hostage:
//!
//! - **Connection caps**: at most `limits.max_connections` open connections, and at most
//!   `limits.max_connections_per_ip` from one source address (0: no per-address cap). A
//!   connection over a cap is answered at once (503 `too_many_connections`, or 429 for the
//!   per-address cap) and closed, so it never holds a file descriptor for long.
//! - **Header timeout**: a request head must arrive complete within
//!   `limits.header_read_timeout_secs` of its first byte — and a new connection must send
//!   its first request within that time (a socket that sends nothing, or a partial
//!   head, is closed).
//! - **Keep-alive timeout**: a connection idle between requests (no byte of a next
//!   request, no byte of an answer still being written) is closed after
//!   `limits.keep_alive_timeout_secs`.
//! - **Send timeout**: a client that stops reading — its socket accepts no more of the
//!   answer for `limits.send_timeout_secs` — is cut, also mid-stream (a stream nobody reads
//!   would otherwise hold its connection and its engine slot: the request deadline only
//!   fires when the next token can be written).
//! - The body-read timeout is the handlers' (see `extract::read_limited`): only they know
//!   whether they read a body.
//!
//! The header and keep-alive timeouts only apply while no request is being served on the
//! connection: a long streamed answer is bounded by the request deadline instead. WebSocket connections
//! leave this watch at the upgrade (they have their own pings) but keep their slot.
//!
//! Figures: `ragnode:http_connections` (open), `ragnode:http_connections_accepted_total`,
//! `ragnode:http_connections_refused_total{reason}`,
//! `ragnode:http_connections_timed_out_total{phase}`, `ragnode:http_accept_errors_total`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;

use super::extract::{BodyGuard, GuardedBody};
use crate::config::Limits;

/// The connection-level limits, from [`Limits`].
#[derive(Clone, Debug)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// 0: no per-address cap.
    pub max_connections_per_ip: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub send_timeout: Duration,
}

impl ConnLimits {
    pub fn from_config(l: &Limits) -> Self {
        Self {
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            header_read_timeout: Duration::from_secs(l.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs(l.keep_alive_timeout_secs),
            send_timeout: Duration::from_secs(l.send_timeout_secs),
        }
    }
}

/// Why a connection was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    Total,
    PerIp,
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Self::Total => "max_connections",
            Self::PerIp => "max_connections_per_ip",
        }
    }

    /// The whole answer written to a refused connection: OpenAI's error shape, then close.
    fn response(self) -> Vec<u8> {
        let (status, message) = match self {
            Self::Total => ("503 Service Unavailable", "the server has too many open connections; retry shortly"),
            Self::PerIp => ("429 Too Many Requests", "too many open connections from your address; retry shortly"),
        };
        let body = serde_json::json!({ "error": {
            "message": message, "type": "server_error", "param": null, "code": "too_many_connections",
        }})
        .to_string();
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Open connections, in total and per source address.
#[derive(Default)]
struct ConnTable {
    /// (open connections, open connections per address): one lock, so the two caps are
    /// checked together.
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's place in the [`ConnTable`]; given back on drop (when its socket
/// closes, also after a WebSocket upgrade).
struct ConnSlot {
    table: Arc<ConnTable>,
    ip: IpAddr,
}

impl ConnTable {
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ConnLimits) -> Result<ConnSlot, Refused> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *g;
        if *total >= limits.max_connections {
            return Err(Refused::Total);
        }
        let mine = per_ip.entry(ip).or_insert(0);
        if limits.max_connections_per_ip > 0 && *mine >= limits.max_connections_per_ip {
            return Err(Refused::PerIp);
        }
        *mine += 1;
        *total += 1;
        metrics::gauge!("ragnode:http_connections").set(*total as f64);
        Ok(ConnSlot { table: self.clone(), ip })
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut g = self.table.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        metrics::gauge!("ragnode:http_connections").set(*total as f64);
    }
}

const NONE: u64 = u64::MAX;

/// What the connection's watchdog needs to know: whether a request is being served,
/// and since when the connection has been idle / reading a head. Times are milliseconds
/// since the connection was accepted.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    idle_since_ms: AtomicU64,
    /// First byte read while idle (a next request's head is arriving).
    first_byte_ms: AtomicU64,
    /// Last write that made progress.
    last_write_ms: AtomicU64,
    /// Since when the socket has refused more of the answer (`NONE`: it has not).
    write_blocked_ms: AtomicU64,
}

/// Which timeout closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Header,
    KeepAlive,
    Send,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::KeepAlive => "keep_alive",
            Self::Send => "send",
        }
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            first_byte_ms: AtomicU64::new(NONE),
            last_write_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(NONE),
        }
    }

    fn on_write<T>(&self, r: &Poll<std::io::Result<T>>) {
        match r {
            Poll::Pending => {
                let _ =
                    self.write_blocked_ms.compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Relaxed);
            }
            Poll::Ready(_) => {
                self.last_write_ms.store(self.now_ms(), Ordering::Release);
                self.write_blocked_ms.store(NONE, Ordering::Release);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.first_byte_ms.compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn request_finished(&self) {
        // Idle fields first, so a watchdog that sees no request in flight sees them.
        self.idle_since_ms.store(self.now_ms(), Ordering::Release);
        self.first_byte_ms.store(NONE, Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// When the connection is to be closed, and under which timeout: a blocked write is
    /// given `send_timeout`; otherwise `None` while a request is served, else the header
    /// or keep-alive timeout.
    fn deadline(&self, limits: &ConnLimits) -> Option<(u64, Phase)> {
        let blocked = self.write_blocked_ms.load(Ordering::Acquire);
        if blocked != NONE {
            return Some((blocked.saturating_add(limits.send_timeout.as_millis() as u64), Phase::Send));
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let header = limits.header_read_timeout.as_millis() as u64;
        let first_byte = self.first_byte_ms.load(Ordering::Acquire);
        if first_byte != NONE {
            return Some((first_byte.saturating_add(header), Phase::Header));
        }
        // Idle since the last request ended, or since the last of its answer was written
        // (hyper may still be writing a large answer when it drops the body).
        let idle_since = self.idle_since_ms.load(Ordering::Acquire).max(self.last_write_ms.load(Ordering::Acquire));
        if self.requests.load(Ordering::Relaxed) == 0 {
            // A new connection owes its first request within the header timeout.
            return Some((idle_since.saturating_add(header), Phase::Header));
        }
        Some((idle_since.saturating_add(limits.keep_alive_timeout.as_millis() as u64), Phase::KeepAlive))
    }

    /// Resolves when the connection has been idle past its deadline.
    async fn watchdog(&self, limits: &ConnLimits) -> Phase {
        let recheck = limits.header_read_timeout.min(limits.keep_alive_timeout).min(limits.send_timeout);
        loop {
            match self.deadline(limits) {
                Some((at, phase)) => {
                    let now = self.now_ms();
                    if now >= at {
                        return phase;
                    }
                    // Wake at the deadline; it is recomputed then (a request may have
                    // started or bytes arrived meanwhile).
                    tokio::time::sleep(Duration::from_millis((at - now).min(recheck.as_millis() as u64))).await;
                }
                None => tokio::time::sleep(recheck).await,
            }
        }
    }
}

/// The socket as hyper sees it: reads are noted for the watchdog; owns the connection's
/// slot (so an upgraded WebSocket keeps it until it closes).
struct TrackedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    _slot: ConnSlot,
}

impl AsyncRead for TrackedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.on_write(&r);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.on_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks a request finished when dropped: with its response body (after the last byte
/// of a stream), or with the handler's future if the connection went away first.
struct RequestDone(Arc<Activity>);

impl BodyGuard for RequestDone {}

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// Accepts and serves connections until `shutdown` resolves, then lets the open ones
/// finish their requests (graceful: no new request is read) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let table = Arc::new(ConnTable::default());
    // Dropped to tell every connection to finish; they hold `close_rx` until they end.
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    metrics::counter!("ragnode:http_accept_errors_total").increment(1);
                    if is_per_connection_error(&e) {
                        continue;
                    }
                    // Out of file descriptors (or similar): back off instead of spinning;
                    // connections closing (timeouts) free some.
                    tracing::warn!("accepting connections: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match table.admit(remote.ip(), &limits) {
            Ok(slot) => slot,
            Err(refused) => {
                metrics::counter!("ragnode:http_connections_refused_total", "reason" => refused.reason()).increment(1);
                tracing::debug!(%remote, reason = refused.reason(), "connection refused");
                tokio::spawn(refuse(stream, refused));
                continue;
            }
        };
        metrics::counter!("ragnode:http_connections_accepted_total").increment(1);
        // Token streams are many small writes: send each at once.
        let _ = stream.set_nodelay(true);
        let conn = Connection { app: app.clone(), limits: limits.clone(), remote };
        let (signal_rx, close_rx) = (signal_rx.clone(), close_rx.clone());
        tokio::spawn(async move {
            conn.run(stream, slot, signal_rx).await;
            drop(close_rx);
        });
    }
    drop(listener);
    drop(signal_rx);
    drop(signal_tx);
    drop(close_rx);
    close_tx.closed().await;
    Ok(())
}

/// Errors of one accepted connection (not of the listener): go on accepting.
fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Answers a connection over a cap and closes it. Its request is read (up to 64 KiB, for
/// a second) and dropped after the answer: closing with unread data would send a reset
/// that can reach the client before the answer does.
async fn refuse(mut stream: TcpStream, why: Refused) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&why.response()).await?;
        stream.shutdown().await?;
        let mut buf = vec![0u8; 16 << 10];
        let mut read = 0;
        while read < 64 << 10 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

struct Connection {
    app: Router,
    limits: ConnLimits,
    remote: SocketAddr,
}

impl Connection {
    async fn run(self, stream: TcpStream, slot: ConnSlot, mut signal: watch::Receiver<()>) {
        let activity = Arc::new(Activity::new());
        let io = TrackedIo { inner: stream, activity: activity.clone(), _slot: slot };
        let (app, remote) = (self.app, self.remote);
        let tracked = activity.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let app = app.clone();
            tracked.request_started();
            let done = RequestDone(tracked.clone());
            async move {
                req.extensions_mut().insert(ConnectInfo(remote));
                let resp = app.oneshot(req).await.unwrap_or_else(|e: Infallible| match e {});
                Ok::<_, Infallible>(resp.map(|inner| Body::new(GuardedBody::new(inner, done))))
            }
        });
        // No hyper timer: its header timeout also cuts keep-alive idling at the same
        // value; the watchdog below applies the two separately.
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service).with_upgrades();
        tokio::pin!(conn);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::trace!(%remote, "connection ended: {e}");
                    }
                    return;
                }
                phase = activity.watchdog(&self.limits) => {
                    // Nothing is being served, or the client stopped reading: dropping the
                    // connection closes the socket (and cancels what it was answering).
                    metrics::counter!("ragnode:http_connections_timed_out_total", "phase" => phase.as_str()).increment(1);
                    tracing::debug!(%remote, phase = phase.as_str(), "idle connection closed");
                    return;
                }
                _ = signal.changed(), if !shutting_down => {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// File descriptors the process may open: raises the soft limit towards the hard one
/// when `needed` (connections plus the node's own files) is more than it allows, and
/// warns when it still falls short. Returns the soft limit in force.
#[cfg(target_os = "linux")]
pub fn ensure_fd_limit(needed: u64) -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` through a valid, exclusive pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    // rlim_t is u64 on 64-bit Linux, u32 on 32-bit.
    #[allow(clippy::unnecessary_cast)]
    let (soft, hard) = (lim.rlim_cur as u64, lim.rlim_max as u64);
    let mut now = soft;
    if soft < needed && hard > soft {
        let raised = libc::rlimit { rlim_cur: needed.min(hard) as libc::rlim_t, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one `rlimit` through a valid pointer; raising the soft
        // limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            now = needed.min(hard);
            tracing::info!(from = soft, to = now, "raised the open-file limit");
        }
    }
    if now < needed {
        tracing::warn!(
            limit = now,
            needed,
            "the open-file limit (ulimit -n) is below what limits.max_connections needs: connections past it \
             fail to be accepted; raise it (systemd: LimitNOFILE=) or lower limits.max_connections"
        );
    }
    Some(now)
}

#[cfg(not(target_os = "linux"))]
pub fn ensure_fd_limit(_needed: u64) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> ConnLimits {
        ConnLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            header_read_timeout: Duration::from_secs(2),
            keep_alive_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(7),
        }
    }

    #[test]
    fn caps_count_total_and_per_address_and_give_slots_back() {
        let table = Arc::new(ConnTable::default());
        let l = limits(3, 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = table.admit(a, &l).unwrap();
        let _a2 = table.admit(a, &l).unwrap();
        assert_eq!(table.admit(a, &l).err(), Some(Refused::PerIp));
        let _b1 = table.admit(b, &l).unwrap();
        assert_eq!(table.admit(b, &l).err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(table.open(), 2);
        let _a3 = table.admit(a, &l).unwrap();
        // No per-address cap.
        let table = Arc::new(ConnTable::default());
        let slots: Vec<_> = (0..3).map(|_| table.admit(a, &limits(3, 0)).unwrap()).collect();
        assert_eq!(table.open(), 3);
        drop(slots);
        assert_eq!(table.open(), 0);
        assert!(table.inner.lock().unwrap().1.is_empty(), "per-address entries are removed at zero");
    }

    #[test]
    fn deadlines_follow_the_connection_phase() {
        let l = limits(10, 0);
        let a = Activity::new();
        // New, silent: the first request is owed within the header timeout.
        assert_eq!(a.deadline(&l), Some((2000, Phase::Header)));
        a.request_started();
        assert_eq!(a.deadline(&l), None, "no timeout while a request is served");
        a.on_read();
        assert_eq!(a.first_byte_ms.load(Ordering::Relaxed), NONE, "body bytes do not start a head");
        a.request_finished();
        let idle = a.idle_since_ms.load(Ordering::Relaxed);
        assert_eq!(a.deadline(&l), Some((idle + 5000, Phase::KeepAlive)));
        a.on_read();
        let first = a.first_byte_ms.load(Ordering::Relaxed);
        assert_eq!(a.deadline(&l), Some((first + 2000, Phase::Header)), "a started head must finish in time");
        // A client that stops reading is cut even mid-answer; writing again lifts it.
        a.request_started();
        a.on_write::<usize>(&Poll::Pending);
        let blocked = a.write_blocked_ms.load(Ordering::Relaxed);
        assert_eq!(a.deadline(&l), Some((blocked + 7000, Phase::Send)));
        a.on_write(&Poll::Ready(Ok(10usize)));
        assert_eq!(a.deadline(&l), None);
    }

    #[test]
    fn refusals_are_complete_http_responses() {
        let r = String::from_utf8(Refused::PerIp.response()).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
        assert!(String::from_utf8(Refused::Total.response()).unwrap().starts_with("HTTP/1.1 503 "));
    }
}
