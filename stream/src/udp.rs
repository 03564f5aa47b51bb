//! UDP sockets for the QUIC endpoints, with large buffers.
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
        BPF_ABS, BPF_AND, BPF_B, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_JSET, BPF_K, BPF_LD,
        BPF_LEN, BPF_RET, BPF_W,
    };
    const ALU_AND: u32 = 0x04 | BPF_AND | BPF_K;
    let op = |code: u32, jt: u8, jf: u8, k: u32| socket2::SockFilter::new(code as u16, jt, jf, k);
    let byte = |at: u32| op(BPF_LD | BPF_B | BPF_ABS, 0, 0, UDP_HEADER + at);
    let len = || op(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0);
    // A jump goes `offset` instructions past the next one; the comments number them.
    const ACCEPT: u8 = 16;
    const DROP: u8 = 17;
    let to = |from: u8, target: u8| target - from - 1;
    vec![
        /* 0 */ len(),
        /* 1 */ op(BPF_JMP | BPF_JGE | BPF_K, 0, to(1, DROP), UDP_HEADER + 21),
        /* 2 */ byte(0),
        /* 3 */ op(BPF_JMP | BPF_JSET | BPF_K, 0, to(3, DROP), 0x40),
        // Short header: quinn checks the rest.
        /* 4 */
        op(BPF_JMP | BPF_JSET | BPF_K, 0, to(4, ACCEPT), 0x80),
        /* 5 */ op(BPF_LD | BPF_W | BPF_ABS, 0, 0, UDP_HEADER + 1),
        /* 6 */ op(BPF_JMP | BPF_JEQ | BPF_K, 0, to(6, DROP), 1),
        /* 7 */ byte(5),
        /* 8 */ op(BPF_JMP | BPF_JGT | BPF_K, to(8, DROP), 0, 20),
        /* 9 */ byte(0),
        /* 10 */ op(ALU_AND, 0, 0, 0x30),
        // Not an Initial (0-RTT, Handshake): quinn checks the rest.
        /* 11 */
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, to(11, ACCEPT), 0),
        /* 12 */ len(),
        /* 13 */
        op(
            BPF_JMP | BPF_JGE | BPF_K,
            0,
            to(13, DROP),
            UDP_HEADER + 1200,
        ),
        /* 14 */ byte(5),
        /* 15 */ op(BPF_JMP | BPF_JGE | BPF_K, to(15, ACCEPT), to(15, DROP), 8),
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
