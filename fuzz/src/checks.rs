//! What each fuzz target asserts about one input, shared by the AFL++ binaries
//! (`fuzz/src/bin/*.rs`) and by `cargo test`, which replays every corpus through the same
//! checks (`tests/fuzz_corpus.rs`). Each check panics when a property is broken.

use http::{HeaderMap, HeaderValue, Uri};
use sse_gateway::testing::{channel, event, frame, h1stream, position, publish, redis, request};

/// A property check of one input.
pub type Check = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("lean_head", lean_head),
    ("request_token", request_token),
    ("cursor", cursor),
    ("payload_frame", payload_frame),
    ("publish_body", publish_body),
    ("pubsub_message", pubsub_message),
    ("grants", grants),
    ("settings", settings),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

/// 1. The lean HTTP/1.1 path: either it takes one complete `GET /events` head and read nothing
///    past it (what follows stays in the socket), or hyper gets exactly the bytes that were
///    read.
pub fn lean_head(data: &[u8]) {
    let mut io = data;
    let start = runtime().block_on(h1stream::classify(
        &mut io,
        std::time::Duration::from_secs(1),
    ));
    match start {
        h1stream::Start::Stream(req) => {
            assert_eq!(req.method(), http::Method::GET);
            let path = req.uri().path();
            assert_eq!(path, "/events", "the lean path took {path}");
            let consumed = &data[..data.len() - io.len()];
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let parsed = httparse::Request::new(&mut headers).parse(consumed);
            assert!(
                matches!(parsed, Ok(httparse::Status::Complete(n)) if n == consumed.len()),
                "the lean path read past the head: {parsed:?}"
            );
        }
        h1stream::Start::Hyper(bytes) => {
            assert!(
                data.starts_with(&bytes),
                "hyper would get bytes that were not sent"
            );
            assert_eq!(
                bytes.len() + io.len(),
                data.len(),
                "bytes were read but handed to nobody"
            );
        }
        h1stream::Start::Closed => assert!(data.is_empty(), "a client that sent bytes was dropped"),
    }
}

/// 2. Query and token extraction: whatever the URL and headers, the redacted path never shows
///    the token, and the token found is one the request carried.
pub fn request_token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (query, cookie, auth) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let secret = "tok-3f9a2c";
    let path = format!("/events?{query}&access_token={secret}");
    let Ok(uri) = path.parse::<Uri>() else { return };
    let pairs = request::query_pairs(&uri);
    let redacted = request::redacted_path(&uri);
    assert!(
        !redacted.contains(secret),
        "a token reached the loggable path: {redacted}"
    );
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(cookie) {
        headers.insert(http::header::COOKIE, v);
    }
    if let Ok(v) = HeaderValue::from_str(auth) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let sources = request::TokenSources {
        cookie: Some("sse_token"),
        query: true,
    };
    if let Ok(Some(token)) = request::request_token(&headers, &pairs, sources) {
        let carried = text.contains(token.as_str()) || token == secret;
        assert!(carried, "a token the request did not carry: {token:?}");
    }
    // Every channel the query names is either refused or inside SPEC §2's alphabet.
    for (k, v) in &pairs {
        if k == "channel" && channel::validate_name(v).is_ok() {
            assert!(
                (1..=200).contains(&v.len())
                    && v.bytes()
                        .all(|b| (b'!'..=b'~').contains(&b) && !b"*,{}".contains(&b)),
                "accepted channel {v:?}"
            );
        }
    }
}

/// 3. Resume cursors: decoding is bounded and never panics; what decodes re-encodes to a
///    cursor that decodes the same.
pub fn cursor(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let channels = ["a".to_string(), "orders".to_string(), "user:x".to_string()];
    let Ok(marks) = position::Cursor::decode(&text, &channels) else {
        return;
    };
    assert!(text.len() <= position::MAX_CURSOR_BYTES);
    let known: Vec<_> = channels
        .iter()
        .zip(&marks)
        .filter_map(|(c, m)| m.clone().map(|m| (std::sync::Arc::from(c.as_str()), m)))
        .collect();
    if known.is_empty() {
        return;
    }
    let again = position::Cursor {
        marks: known.clone(),
    }
    .encode();
    let back = position::Cursor::decode(&again, &channels).expect("a re-encoded cursor decodes");
    let back: Vec<_> = channels
        .iter()
        .zip(back)
        .filter_map(|(c, m)| m.map(|m| (std::sync::Arc::from(c.as_str()), m)))
        .collect();
    assert_eq!(back, known);
}

/// Parses an SSE body the way a browser does (an independent parser), into (event, data, id).
fn sse_events(body: &[u8]) -> Vec<(String, String, String)> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let chunk: Result<bytes::Bytes, std::io::Error> = Ok(bytes::Bytes::copy_from_slice(body));
    let stream = futures_util::stream::iter([chunk]).eventsource();
    runtime().block_on(async {
        stream
            .filter_map(|e| async move { e.ok() })
            .map(|e| (e.event, e.data, e.id))
            .collect()
            .await
    })
}

/// 4. Publisher payloads to frames: a payload either is refused or becomes exactly one event
///    with the type and data lines it asked for, never an `id:`, `retry:` or extra event.
pub fn payload_frame(data: &[u8]) {
    let Ok(ev) = event::parse_payload(data, 65_536) else {
        return;
    };
    let Ok(bytes) = frame::encode(&ev) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("id:") || l.starts_with("retry:")),
        "{text:?}"
    );
    assert!(ev.id.is_none(), "a publisher's id reached the frame");
    // The browser-side parser reads UTF-8; other bytes are passed through as they are.
    let Ok(data) = std::str::from_utf8(&ev.data) else {
        return;
    };
    let events = sse_events(&bytes);
    assert_eq!(events.len(), 1, "{text:?} parsed as {events:?}");
    let (name, body, id) = &events[0];
    assert_eq!(id, "", "{text:?}");
    let wanted_name = ev
        .event
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("message");
    assert_eq!(name, wanted_name, "{text:?}");
    // The data lines: the payload's data with line ends normalised to LF, as a browser sees it.
    let want = data.replace("\r\n", "\n").replace('\r', "\n");
    assert_eq!(body, &want, "{text:?}");
}

/// 5. `POST /publish` bodies: refused with a status the contract names, or an envelope whose
///    channels are valid, granted and at most 32, within the size limit.
pub fn publish_body(data: &[u8]) {
    let grants = vec!["orders".to_string(), "team:*".to_string()];
    match publish::envelope(data, 4096, &grants) {
        Ok(env) => {
            assert!(!env.channels.is_empty() && env.channels.len() <= 32);
            for c in &env.channels {
                assert!(
                    channel::validate_name(c).is_ok() && channel::granted(&grants, c),
                    "{c:?}"
                );
            }
            assert!(env.payload.len() <= 4096);
            assert!(
                event::parse_payload(&env.payload, 4096).is_ok(),
                "its own envelope does not parse"
            );
        }
        Err(e) => assert!([400, 403, 413].contains(&e.status().as_u16()), "{e:?}"),
    }
}

/// 6. Redis messages as the broker reads them: a sharded push (values built from the input)
///    yields its channel and payload or nothing; a message is never a durable event unless it
///    carries a MAC under the key, and a signed one always reads back exactly.
pub fn pubsub_message(data: &[u8]) {
    let values: Vec<::redis::Value> = data
        .split(|&b| b == 0xff)
        .map(|part| match part.first() {
            Some(b'i') => ::redis::Value::Int(part.len() as i64),
            Some(b'n') => ::redis::Value::Nil,
            Some(b's') => ::redis::Value::SimpleString(String::from_utf8_lossy(part).into_owned()),
            _ => ::redis::Value::BulkString(part.to_vec()),
        })
        .collect();
    if let Some((name, payload)) = sse_gateway::testing::broker::redis::shard_message(&values) {
        assert!(matches!(values[0], ::redis::Value::BulkString(_)));
        let mut parts = data.split(|&b| b == 0xff);
        assert_eq!(
            parts.next().map(String::from_utf8_lossy).as_deref(),
            Some(name.as_str())
        );
        assert_eq!(parts.next(), Some(payload));
    }
    let key = position::DurableKey::from_hex(&"ab".repeat(32)).expect("a key");
    match position::decode_durable(Some(&key), "orders", data) {
        position::Incoming::Durable(..) => {
            panic!("bytes nobody signed were taken as a durable event: {data:?}")
        }
        position::Incoming::Plain(p) => assert_eq!(p, data),
        position::Incoming::Forged => assert_eq!(data.first(), Some(&0)),
    }
    let pos = position::Position {
        ms: data.len() as u64,
        seq: 7,
    };
    let signed = position::encode_durable(&key, "orders", "e1", pos, data);
    assert_eq!(
        position::decode_durable(Some(&key), "orders", &signed),
        position::Incoming::Durable("e1", pos, data)
    );
}

/// The contract's grant rule, written independently: exact, or a prefix ending in one `*`.
fn reference_granted(grants: &[String], name: &str) -> bool {
    grants.iter().any(|g| match g.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => name.starts_with(prefix),
        _ => g == name,
    })
}

/// 7. Grants: the gateway's matching agrees with the reference on every name and grant list.
pub fn grants(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let name = lines.next().unwrap_or("");
    let grants: Vec<String> = lines.map(str::to_string).collect();
    assert_eq!(
        channel::granted(&grants, name),
        reference_granted(&grants, name),
        "{name:?} against {grants:?}"
    );
}

/// 8. Settings with structure: Redis URLs and CORS lists parse or are refused, never panic,
///    and a refusal never echoes a password.
pub fn settings(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Whatever the URL, parsing it never panics; and with a marker password put into its user
    // info, no refusal shows the password.
    let _ = redis::Topology::parse(&text);
    const MARK: &str = "Pw7-marker-Q9";
    let marked = match text.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, hosts)) => format!("{scheme}://user:{MARK}@{hosts}"),
            None => format!("{scheme}://user:{MARK}@{rest}"),
        },
        None => format!("redis://user:{MARK}@{text}"),
    };
    if let Err(e) = redis::Topology::parse(&marked) {
        assert!(!e.contains(MARK), "a password in an error: {e}");
    }
    if let Ok(Some(sse_gateway::config::CorsOrigins::List(list))) =
        sse_gateway::config::CorsOrigins::parse(Some(&text))
    {
        assert!(list
            .iter()
            .all(|o| o.starts_with("http://") || o.starts_with("https://")));
    }
}
