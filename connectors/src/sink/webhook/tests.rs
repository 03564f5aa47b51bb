use super::*;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

use crate::sink::Item;
use tideline_wal::{Gtid, Offset, Op, Transaction};

/// The most bytes of a `Tideline-Gtid-Range` value, as docs/OPERATIONS.md states it.
const DOCUMENTED_RANGE_BYTES_MAX: usize = 4096;
/// nginx's default header line limit (`large_client_header_buffers 4 8k`).
const PROXY_LINE_BYTES_MAX: usize = 8192;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    range: Option<String>,
    envelopes: Vec<Value>,
}

/// A receiver behind a proxy with nginx's header limit: a header line longer than
/// [`PROXY_LINE_BYTES_MAX`] gets `431`; otherwise the request is recorded and answered
/// 200. Plain HTTP/1.1 on blocking threads, keep-alive included.
fn proxied_receiver() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || serve_connection(conn, &seen));
        }
    });
    (url, out)
}

fn serve_connection(conn: std::net::TcpStream, seen: &Mutex<Vec<Seen>>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut range, mut too_long) = (0usize, None, false);
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            too_long |= line.len() > PROXY_LINE_BYTES_MAX;
            let (k, v) = line.trim_end().split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap(),
                GTID_RANGE_HEADER => range = Some(v.trim().to_owned()),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        r.read_exact(&mut body).unwrap();
        let answer = if too_long {
            "431 Request Header Fields Too Large"
        } else {
            let envelopes = serde_json::from_slice(&body).unwrap();
            seen.lock().unwrap().push(Seen { range, envelopes });
            "200 OK"
        };
        write!(w, "HTTP/1.1 {answer}\r\ncontent-length: 0\r\n\r\n").unwrap();
    }
}

/// `n` one-put transactions whose GTID numbers skip every other one (1, 3, 5, ...), as a
/// tree or prefix filter leaves them.
fn sparse_batch(n: u64) -> Batch {
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let items = (1..=n)
        .map(|i| {
            Item::Txn(Transaction {
                offset: Offset::new(2 * i - 1).unwrap(),
                gtid: Gtid::new(uuid, 2 * i - 1).unwrap(),
                timestamp_us: 1_700_000_000_000_000,
                ops: vec![Op::Put {
                    tree: "t".into(),
                    key: format!("k{i}").into_bytes(),
                    value: b"v".to_vec(),
                    before: None,
                }],
            })
        })
        .collect();
    Batch {
        source: uuid,
        items,
        checkpoint: b"cp".to_vec(),
    }
}

/// A filtered batch of the default size (10,000 changes, sparse GTIDs) must reach a
/// receiver behind a proxy with an 8 KiB header limit: every request's GTID range within
/// the documented bound, each naming exactly the GTIDs of its body, ranges ascending (so
/// the receiver's de-duplication rule holds), and every change once over all requests.
/// Guards against a header that grows with the batch, which the proxy answers with 431
/// and the pipeline holds on for ever.
#[tokio::test]
async fn a_sparse_batch_is_posted_with_bounded_gtid_ranges_and_every_change_once() {
    let (url, seen) = proxied_receiver();
    let dir = tempfile::tempdir().unwrap();
    let pos = dir.path().join("hook.position");
    let mut sink = WebhookSink::new(WebhookConfig::new(&url, &pos), "p").unwrap();
    sink.open().await.unwrap();
    let batch = sparse_batch(10_000);
    sink.write(&batch).await.expect("the batch is delivered");
    assert_eq!(
        read_position(&pos, "p").unwrap().as_deref(),
        Some(&b"cp"[..])
    );

    let seen = seen.lock().unwrap().clone();
    let mut all = Vec::new();
    let mut previous_last = 0;
    for (i, req) in seen.iter().enumerate() {
        let range = req
            .range
            .as_deref()
            .expect("a live request names its GTIDs");
        assert!(
            range.len() <= DOCUMENTED_RANGE_BYTES_MAX,
            "request {i}: a GTID range of {} bytes",
            range.len()
        );
        // Cut near the bound, not into needlessly many requests.
        assert!(
            i + 1 == seen.len() || range.len() > DOCUMENTED_RANGE_BYTES_MAX * 3 / 4,
            "request {i} of {}: a GTID range of only {} bytes",
            seen.len(),
            range.len()
        );
        let range: GtidSet = range.parse().unwrap();
        let mut body = GtidSet::new();
        for e in &req.envelopes {
            let g: Gtid = e["source"]["gtid"].as_str().unwrap().parse().unwrap();
            body.insert(g);
            all.push(g.seq);
        }
        assert_eq!(
            range, body,
            "request {i}: the header names its body's GTIDs"
        );
        let first = range.intervals(&batch.source)[0].start;
        assert!(first > previous_last, "request {i}: ranges ascend");
        previous_last = range.last_seq(&batch.source).unwrap();
    }
    assert!(seen.len() > 1, "the batch needs several requests");
    let want: Vec<u64> = (1..=10_000).map(|i| 2 * i - 1).collect();
    assert_eq!(all, want, "every change once, in log order");
}

/// A 431 (headers too large) says so, with the header bytes sent and what to change.
#[tokio::test]
async fn a_431_names_the_oversized_headers_and_the_remedy() {
    let (url, _seen) = proxied_receiver();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WebhookConfig::new(&url, dir.path().join("hook.position"));
    cfg.headers
        .insert("x-big".into(), "a".repeat(PROXY_LINE_BYTES_MAX));
    let mut sink = WebhookSink::new(cfg, "p").unwrap();
    sink.open().await.unwrap();
    let e = sink.write(&sparse_batch(3)).await.unwrap_err();
    let SinkError::Hold(m) = &e else {
        panic!("a 431 holds: {e}")
    };
    assert!(m.contains("headers were too large"), "{m}");
    assert!(
        m.contains("`headers`"),
        "names the config key to shorten: {m}"
    );
}

#[test]
fn the_position_file_round_trips_and_refuses_another_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pos.json");
    assert_eq!(read_position(&path, "p").unwrap(), None);
    write_position(&path, "p", b"{\"tail\":1}").unwrap();
    assert_eq!(
        read_position(&path, "p").unwrap().as_deref(),
        Some(&b"{\"tail\":1}"[..])
    );
    let e = read_position(&path, "q").unwrap_err();
    assert!(matches!(&e, SinkError::Hold(m) if m.contains("belongs to pipeline \"p\"")));
    std::fs::write(&path, b"garbage").unwrap();
    let e = read_position(&path, "p").unwrap_err();
    assert!(matches!(&e, SinkError::Hold(m) if m.contains("does not decode")));
}

/// Two connectors sharing a position file would each move it over the other's: the
/// second waits (`Retry` naming the first) until the first is gone.
#[tokio::test]
async fn a_second_sink_on_the_same_position_file_waits_until_the_first_is_gone() {
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", receiver.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let pos = dir.path().join("hook.position");
    let mut first = WebhookSink::new(WebhookConfig::new(&url, &pos), "p").unwrap();
    let mut second = WebhookSink::new(WebhookConfig::new(&url, &pos), "p").unwrap();
    assert_eq!(first.open().await.unwrap(), None);
    let e = second
        .open()
        .await
        .expect_err("the file is the first sink's");
    assert!(
        matches!(&e, SinkError::Retry(m) if m.contains("another connector")
            && m.contains(&format!("PID {}", std::process::id()))),
        "{e}"
    );
    drop(first);
    assert_eq!(second.open().await.unwrap(), None);
}

/// A receiver on a raw socket: reads each request whole (head and body), then writes
/// `answer` and, when `body_bytes` > 0, that many more bytes of body as fast as the sink
/// takes them; then holds the connection open without a word. Returns its URL and how
/// many body bytes it got written into the socket.
fn raw_receiver(answer: &'static str, body_bytes: usize) -> (String, Arc<Mutex<usize>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let written = Arc::new(Mutex::new(0usize));
    let out = written.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let written = written.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                if w.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                let chunk = [b'x'; 64 * 1024];
                let mut left = body_bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if w.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                    *written.lock().unwrap() += n;
                }
                // Hold the connection (the body, if promised longer, never ends).
                std::thread::sleep(Duration::from_secs(60));
            });
        }
    });
    (url, out)
}

/// A receiver that sends its 2xx status line and headers, then stalls its body, has
/// stored the batch: the docs say "2xx: stored". The sink must take the status line as
/// the answer, move the position, and not wait for (or re-send because of) the body.
#[tokio::test]
async fn a_2xx_whose_body_stalls_is_stored_and_the_position_moves() {
    let (url, _) = raw_receiver("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", 0);
    let dir = tempfile::tempdir().unwrap();
    let pos = dir.path().join("hook.position");
    let mut cfg = WebhookConfig::new(&url, &pos);
    cfg.timeout_ms = 200;
    let mut sink = WebhookSink::new(cfg, "p").unwrap();
    sink.open().await.unwrap();
    sink.write(&sparse_batch(3))
        .await
        .expect("a 2xx status line is the receiver's answer; its body does not matter");
    assert_eq!(
        read_position(&pos, "p").unwrap().as_deref(),
        Some(&b"cp"[..]),
        "the position moved after the 2xx"
    );
}

/// An error answer with an endless body: the sink reads a bounded part of it (the
/// message uses the first line) and answers on time, with the status and that line.
#[tokio::test]
async fn an_error_body_is_read_only_in_part_and_the_answer_comes_on_time() {
    // 64 MiB promised and sent as fast as the sink reads; a cap leaves most unsent.
    const SENT_BYTES: usize = 64 << 20;
    let answer = "HTTP/1.1 400 Bad Request\r\ncontent-length: 67108864\r\n\r\n";
    let (url, written) = raw_receiver(answer, SENT_BYTES);
    let dir = tempfile::tempdir().unwrap();
    let pos = dir.path().join("hook.position");
    let mut sink = WebhookSink::new(WebhookConfig::new(&url, &pos), "p").unwrap();
    sink.open().await.unwrap();
    let e = sink.write(&sparse_batch(3)).await.unwrap_err();
    let SinkError::Hold(m) = &e else {
        panic!("a 400 holds: {e}")
    };
    assert!(m.contains("400") && m.contains("xxxx"), "{m}");
    // Socket buffers take a few MiB whatever the sink reads; all 64 means it read all.
    let sent = *written.lock().unwrap();
    assert!(
        sent < SENT_BYTES / 4,
        "the sink read {sent} bytes of an error body it uses 200 characters of"
    );
    assert!(!pos.exists(), "the position moved on a 400");
}

/// An error answer whose body stalls after its first line: the answer is the status and
/// that line, at once, not a timeout.
#[tokio::test]
async fn an_error_whose_body_stalls_is_reported_with_its_status() {
    let answer = "HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 1000\r\n\r\n\
                  bad field `x`\n";
    let (url, _) = raw_receiver(answer, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WebhookConfig::new(&url, dir.path().join("hook.position"));
    cfg.timeout_ms = 5_000;
    let mut sink = WebhookSink::new(cfg, "p").unwrap();
    sink.open().await.unwrap();
    let e = sink.write(&sparse_batch(3)).await.unwrap_err();
    assert!(
        matches!(&e, SinkError::Hold(m) if m.contains("422") && m.contains("bad field `x`")),
        "{e}"
    );
}

/// A receiver that never answers: the retry message names the keys that bound one POST
/// (`timeout_ms`) and its size (`batch_changes`): a batch too large to upload or handle
/// in time otherwise retries for ever with no hint.
#[tokio::test]
async fn a_timeout_names_timeout_ms_and_batch_changes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            keep.lock().unwrap().push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WebhookConfig::new(&url, dir.path().join("hook.position"));
    cfg.timeout_ms = 100;
    let mut sink = WebhookSink::new(cfg, "p").unwrap();
    sink.open().await.unwrap();
    let e = sink.write(&sparse_batch(3)).await.unwrap_err();
    assert!(
        matches!(&e, SinkError::Retry(m) if m.contains("timeout_ms")
            && m.contains("batch_changes")),
        "{e}"
    );
}

/// Credentials in the URL's user info never reach the receiver (the client sends no
/// Basic auth), so the sink refuses them and says to use `headers`; and no message of
/// the sink shows user info or a query (`?token=`), as `describe()` does not.
#[tokio::test]
async fn user_info_is_refused_and_no_message_shows_a_urls_secrets() {
    let secret = |m: &str| m.contains("s3cret") || m.contains("token=t");
    let e = WebhookSink::new(
        WebhookConfig::new("http://u:s3cret@127.0.0.1:1/x?token=t", "p"),
        "p",
    )
    .err()
    .expect("user info is refused");
    assert!(matches!(e, SinkError::Fatal(_)), "{e}");
    let m = e.message();
    assert!(
        m.contains("headers") && m.contains("Authorization"),
        "points to headers: {m}"
    );
    assert!(!secret(m), "{m}");
    // Refused forms, and a URL that does not parse, keep the secrets out too.
    for url in [
        "https://u:s3cret@h/x?token=t",
        "ftp://u:s3cret@h/x?token=t",
        "http://u:s3cret@h:port/x?token=t",
        "http:///x?token=t#s3cret",
    ] {
        let e = WebhookSink::new(WebhookConfig::new(url, "p"), "p")
            .err()
            .unwrap_or_else(|| panic!("{url} is refused"));
        assert!(!secret(e.message()), "{url}: {e}");
    }
    // A query: accepted, and neither open, a write nor describe shows it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let mut sink = WebhookSink::new(
        WebhookConfig::new(
            format!("http://{addr}/x?token=t#s3cret"),
            dir.path().join("hook.position"),
        ),
        "p",
    )
    .unwrap();
    assert!(!secret(&sink.describe()), "{}", sink.describe());
    let e = sink.open().await.expect_err("nothing listens");
    assert!(matches!(e, SinkError::Retry(_)), "{e}");
    assert!(!secret(e.message()), "{e}");
    let e = sink
        .write(&sparse_batch(3))
        .await
        .expect_err("nothing listens");
    assert!(matches!(e, SinkError::Retry(_)), "{e}");
    assert!(!secret(e.message()), "{e}");
    assert!(e.message().contains(&format!("http://{addr}/x")), "{e}");
}

#[test]
fn https_and_bad_headers_are_refused_up_front() {
    let e = WebhookSink::new(WebhookConfig::new("https://x/y", "p"), "p")
        .err()
        .unwrap();
    assert!(e.message().contains("https is not supported"), "{e}");
    let mut cfg = WebhookConfig::new("http://127.0.0.1:1/x", "p");
    cfg.headers.insert("bad header".into(), "v".into());
    let e = WebhookSink::new(cfg, "p").err().unwrap();
    assert!(e.message().contains("not an HTTP header name"), "{e}");
}
