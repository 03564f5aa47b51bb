//! Bare quinn: the same bytes on one stream, the baseline every tail is compared with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, ensure};
use tideline_stream::{ClientSecrets, ServerSecrets, tls};

use super::*;

pub(super) const BARE_ALPN: &[u8] = b"tideline-bench/bare";

pub(super) fn udp_socket(buffer_bytes: Option<usize>) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .context("create a UDP socket")?;
    if let Some(b) = buffer_bytes {
        sock.set_recv_buffer_size(b)
            .context("set the UDP receive buffer")?;
        sock.set_send_buffer_size(b)
            .context("set the UDP send buffer")?;
    }
    sock.bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))
        .context("bind a UDP socket on loopback")?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

pub(super) fn bare_server_config(secrets: &ServerSecrets) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(secrets.chain.clone(), secrets.key.clone_key())?;
    tls_cfg.alpn_protocols = vec![BARE_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls_cfg)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

pub(super) fn bare_client_config(secrets: &ClientSecrets) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(secrets.ca.clone())?;
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![BARE_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// What a bare quinn transfer measured.
pub(super) struct Bare {
    pub(super) seconds: f64,
    pub(super) lost_packets: u64,
    pub(super) sent_packets: u64,
}

/// The server side sends `bytes` in `write_bytes` writes on one stream; the client reads them
/// with `read_chunk`. Same TLS material as Tideline, same runtime layout. Seconds are measured
/// by the client from opening the stream to its end.
pub(super) fn bare_quinn(
    ctx: &Ctx,
    bytes: u64,
    write_bytes: usize,
    buffer_bytes: Option<usize>,
) -> anyhow::Result<Bare> {
    let (server_rt, client_rt) = (&ctx.server_rt, &ctx.client_rt);
    let server_cfg = bare_server_config(&ctx.server_secrets)?;
    let client_cfg = bare_client_config(&ctx.client_secrets)?;
    let server_sock = udp_socket(buffer_bytes)?;
    let client_sock = udp_socket(buffer_bytes)?;
    let server_ep = server_rt.run(async move {
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_cfg),
            server_sock,
            Arc::new(quinn::TokioRuntime),
        )
    })??;
    let server_addr = server_ep.local_addr()?;
    let ep = server_ep.clone();
    let sender = server_rt.start_task(async move {
        let incoming = ep.accept().await.context("bare: no connection came")?;
        let conn = incoming.await.context("bare: server handshake")?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut go = [0u8; 1];
        recv.read_exact(&mut go).await?;
        let buf = vec![0x42u8; write_bytes];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(write_bytes as u64) as usize;
            send.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        send.finish()?;
        let _ = send.stopped().await;
        let stats = conn.stats();
        conn.close(quinn::VarInt::from_u32(0), b"done");
        Ok::<_, anyhow::Error>((stats.path.lost_packets, stats.path.sent_packets))
    });
    let seconds = client_rt.run(async move {
        let mut ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            client_sock,
            Arc::new(quinn::TokioRuntime),
        )?;
        ep.set_default_client_config(client_cfg);
        let conn = ep
            .connect(server_addr, tls::SERVER_NAME)?
            .await
            .context("bare: client handshake")?;
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[1]).await?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            got += chunk.bytes.len() as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        ensure!(got == bytes, "bare: received {got} of {bytes} bytes");
        let _ = send.finish();
        conn.close(quinn::VarInt::from_u32(0), b"done");
        ep.wait_idle().await;
        Ok::<_, anyhow::Error>(secs)
    })??;
    let (lost_packets, sent_packets) =
        sender.recv().context("bare: the sender task vanished")??;
    server_rt.run(async move {
        server_ep.close(quinn::VarInt::from_u32(0), b"done");
        server_ep.wait_idle().await;
    })?;
    Ok(Bare {
        seconds,
        lost_packets,
        sent_packets,
    })
}
