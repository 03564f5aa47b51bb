//! UDP sockets for the QUIC endpoints, with large buffers, and the server socket's filter of
//! datagrams that cannot be QUIC for it.
//!
//! QUIC on loopback bursts faster than the kernel's default socket buffers drain; the drops
//! that follow halve the congestion window. 4 MiB buffers removed the 0.4–2% loopback packet
//! loss seen with defaults. The kernel caps the size at `net.core.rmem_max` / `wmem_max`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Default send and receive buffer size of Tideline's UDP sockets.
pub const UDP_BUFFER_BYTES_DEFAULT: usize = 4 << 20;

/// Binds a non-blocking UDP socket at `addr` with `buffer_bytes` send and receive buffers
/// (0 keeps the kernel's defaults).
pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if buffer_bytes > 0 {
        sock.set_recv_buffer_size(buffer_bytes)?;
        sock.set_send_buffer_size(buffer_bytes)?;
    }
    sock.bind(&SockAddr::from(addr))?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// A quinn endpoint on `socket`.
pub(crate) fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut cfg = quinn::EndpointConfig::default();
    if server.is_some() {
        // Peers must keep the fixed bit (RFC 9287 lets them clear it once told they may):
        // the server's socket filter drops datagrams without it.
        cfg.grease_quic_bit(false);
    }
    quinn::Endpoint::new(cfg, server, socket, Arc::new(quinn::TokioRuntime))
}

/// Bytes of the UDP header, which a socket filter sees before the payload.
#[cfg(target_os = "linux")]
const UDP_HEADER: u32 = 8;

/// The socket filter of a server's socket, in classic BPF: it drops in the kernel, before the
/// node wakes up for them, datagrams that cannot be a QUIC v1 packet for a server (RFC 9000
/// §17, RFC 9001 §5.2): shorter than 21 bytes (the smallest packet, a stateless reset); the
/// fixed bit clear (the node's endpoint does not let peers grease it); a long header with a
/// version other than 1 (Tideline speaks only QUIC v1: such a peer gets no Version
/// Negotiation) or a destination connection id longer than 20 bytes; an Initial in a datagram
/// under 1,200 bytes, or with a destination connection id under 8 bytes. Everything else goes
/// to quinn, which checks the rest (connection ids, decryption). A flood of random bytes is
/// three quarters refused here; on loopback the filter even runs on the sender's CPU.
#[cfg(target_os = "linux")]
fn server_filter() -> Vec<socket2::SockFilter> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_AND, BPF_B, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_JSET, BPF_K,
        BPF_LD, BPF_LEN, BPF_RET, BPF_W,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| socket2::SockFilter::new(code as u16, jt, jf, k);
    let byte = |at: u32| op(BPF_LD | BPF_B | BPF_ABS, 0, 0, UDP_HEADER + at);
    let len = || op(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0);
    // A jump goes `offset` instructions past the next one; the comments number them.
    const ACCEPT: u8 = 16;
    const DROP: u8 = 17;
    let to = |from: u8, target: u8| target - from - 1;
    // `cond` against `k` at instruction `at`: on true to `yes`, else to `no` (`None`: the next).
    let jump = |at: u8, cond: u32, k: u32, yes: Option<u8>, no: Option<u8>| {
        let (jt, jf) = (yes.map_or(0, |t| to(at, t)), no.map_or(0, |t| to(at, t)));
        op(BPF_JMP | cond | BPF_K, jt, jf, k)
    };
    vec![
        /* 0 */ len(),
        /* 1 */ jump(1, BPF_JGE, UDP_HEADER + 21, None, Some(DROP)),
        /* 2 */ byte(0),
        /* 3 */ jump(3, BPF_JSET, 0x40, None, Some(DROP)),
        // Short header: quinn checks the rest.
        /* 4 */
        jump(4, BPF_JSET, 0x80, None, Some(ACCEPT)),
        /* 5 */ op(BPF_LD | BPF_W | BPF_ABS, 0, 0, UDP_HEADER + 1),
        /* 6 */ jump(6, BPF_JEQ, 1, None, Some(DROP)),
        /* 7 */ byte(5),
        /* 8 */ jump(8, BPF_JGT, 20, Some(DROP), None),
        /* 9 */ byte(0),
        /* 10 */ op(BPF_ALU | BPF_AND | BPF_K, 0, 0, 0x30),
        // Not an Initial (0-RTT, Handshake): quinn checks the rest.
        /* 11 */
        jump(11, BPF_JEQ, 0, None, Some(ACCEPT)),
        /* 12 */ len(),
        /* 13 */ jump(13, BPF_JGE, UDP_HEADER + 1200, None, Some(DROP)),
        /* 14 */ byte(5),
        /* 15 */ jump(15, BPF_JGE, 8, Some(ACCEPT), Some(DROP)),
        /* 16 */ op(BPF_RET | BPF_K, 0, 0, u32::MAX),
        /* 17 */ op(BPF_RET | BPF_K, 0, 0, 0),
    ]
}

/// Attaches [`server_filter`] to a server's `socket`. Where the kernel refuses it (or off
/// Linux) the node serves without it: quinn drops the same datagrams, at a higher cost.
pub(crate) fn attach_server_filter(socket: &UdpSocket) {
    #[cfg(target_os = "linux")]
    if let Err(e) = socket2::SockRef::from(socket).attach_filter(&server_filter()) {
        tracing::warn!(
            error = %e,
            "could not attach the datagram filter to the server's socket; serving without it \
             (garbage datagrams then cost the node a wakeup each)"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}
