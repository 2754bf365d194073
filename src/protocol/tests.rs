use super::*;
use rand::{Rng, SeedableRng};

fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            agent_id: "web-1".into(),
            namespace: "default".into(),
            ips: vec!["10.1.2.3".parse().unwrap(), "fd00::1".parse().unwrap()],
            ports: vec!["9100".parse().unwrap(), "8000-8080".parse().unwrap()],
            token: "s3cret".into(),
        }),
        Message::Welcome(Welcome {
            relay_id: "relay-1".into(),
            session_id: 7,
            live_relays: 3,
        }),
        Message::Reject(Reject {
            code: Code::Unauthorized,
            reason: "bad token".into(),
        }),
        Message::Open(Open {
            target: "10.1.2.3:9100".parse().unwrap(),
            session_id: 7,
        }),
        Message::OpenResult(OpenResult {
            code: Code::NotMine,
        }),
        Message::Forward(Forward {
            namespace: "default".into(),
            target: "[fd00::1]:80".parse().unwrap(),
            session_id: None,
        }),
        Message::ForwardResult(OpenResult { code: Code::Ok }),
        Message::Ping { nonce: u64::MAX },
        Message::Pong {
            nonce: 0,
            live_relays: 3,
        },
        Message::Drain { grace_ms: 30_000 },
    ]
}

#[tokio::test]
async fn round_trip_over_tiny_duplex_buffer() {
    let (mut a, mut b) = tokio::io::duplex(3);
    let msgs = samples();
    let sent = msgs.clone();
    let writer = tokio::spawn(async move {
        for m in &sent {
            write_message(&mut a, m).await.unwrap();
        }
        // Raw bytes after the last frame must stay unread by the frame reader.
        a.write_all(b"raw").await.unwrap();
    });
    for m in &msgs {
        assert_eq!(&read_message(&mut b).await.unwrap(), m);
    }
    let mut rest = [0u8; 3];
    b.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"raw");
    writer.await.unwrap();
}

#[tokio::test]
async fn oversized_and_wrong_version_frames_are_refused() {
    let (mut a, mut b) = tokio::io::duplex(16);
    a.write_all(&[VERSION, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(matches!(
        read_message(&mut b).await,
        Err(Error::TooLarge(_))
    ));
    let (mut a, mut b) = tokio::io::duplex(16);
    a.write_all(&[9, 0, 0, 0, 2, b'{', b'}']).await.unwrap();
    assert!(matches!(read_message(&mut b).await, Err(Error::Version(9))));
}

#[tokio::test]
async fn truncated_frame_is_an_error_not_a_hang() {
    let frame = encode(&samples()[0]).unwrap();
    for cut in 0..frame.len() {
        let (mut a, mut b) = tokio::io::duplex(4);
        let part = frame[..cut].to_vec();
        tokio::spawn(async move {
            a.write_all(&part).await.unwrap();
            drop(a);
        });
        assert!(read_message(&mut b).await.is_err(), "cut at {cut}");
        assert!(matches!(decode(&frame[..cut]), Ok(None)), "cut at {cut}");
    }
}

#[tokio::test]
async fn frame_reader_survives_cancellation() {
    let (mut a, mut b) = tokio::io::duplex(2);
    let msgs = samples();
    let sent = msgs.clone();
    tokio::spawn(async move {
        for m in &sent {
            write_message(&mut a, m).await.unwrap();
        }
    });
    let mut reader = FrameReader::default();
    let mut got = Vec::new();
    while got.len() < msgs.len() {
        // Race every read against a timer that often wins, dropping the read half-way.
        tokio::select! {
            m = reader.next(&mut b) => got.push(m.unwrap()),
            _ = tokio::task::yield_now() => {}
        }
    }
    assert_eq!(got, msgs);
}

#[tokio::test]
async fn read_times_out() {
    let (_a, mut b) = tokio::io::duplex(16);
    let err = read_message_timeout(&mut b, Duration::from_millis(20))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)));
}

/// Random, mutated and truncated inputs: decode must return, never panic.
#[test]
fn decoding_arbitrary_bytes_never_panics() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9057_e27);
    let frames: Vec<Vec<u8>> = samples().iter().map(|m| encode(m).unwrap()).collect();
    let mut decoded_ok = 0;
    for i in 0..200_000 {
        let mut input = if i % 2 == 0 {
            let len = rng.random_range(0..64);
            (0..len).map(|_| rng.random()).collect::<Vec<u8>>()
        } else {
            frames[i % frames.len()].clone()
        };
        if i % 2 == 1 {
            for _ in 0..rng.random_range(1..4) {
                if input.is_empty() {
                    break;
                }
                let at = rng.random_range(0..input.len());
                input[at] = rng.random();
            }
            let cut = rng.random_range(0..=input.len());
            input.truncate(cut);
        }
        if let Ok(Some(_)) = decode(&input) {
            decoded_ok += 1;
        }
    }
    // Some mutations land in JSON whitespace-insensitive spots or are cut after the frame;
    // most must be rejected.
    assert!(decoded_ok < 100_000);
}

#[test]
fn codes_map_to_socks_and_http() {
    assert_eq!(Code::NoRoute.socks5_reply(), 0x04);
    assert_eq!(Code::NotAllowed.socks5_reply(), 0x02);
    assert_eq!(Code::ConnectionRefused.socks5_reply(), 0x05);
    assert_eq!(Code::NotAllowed.http_status(), 403);
    assert_eq!(Code::Unauthorized.http_status(), 407);
    assert_eq!(Code::Timeout.http_status(), 504);
    assert_eq!(Code::NoRoute.http_status(), 502);
}

#[test]
fn port_ranges_parse() {
    assert_eq!(
        "80".parse::<PortRange>().unwrap(),
        PortRange { start: 80, end: 80 }
    );
    assert_eq!(
        "80-90".parse::<PortRange>().unwrap(),
        PortRange { start: 80, end: 90 }
    );
    assert!("90-80".parse::<PortRange>().is_err());
    assert!("0".parse::<PortRange>().is_err());
    assert!("x".parse::<PortRange>().is_err());
    assert!("70000".parse::<PortRange>().is_err());
}

#[test]
fn a_token_never_prints() {
    let token = "tok-3f9a1c";
    let hello = Message::Hello(Hello {
        agent_id: "web-1".into(),
        namespace: "default".into(),
        ips: vec![],
        ports: vec![],
        token: token.into(),
    });
    for shown in [format!("{hello:?}"), format!("{hello:#?}")] {
        assert!(!shown.contains(token), "{shown}");
        assert!(shown.contains("Secret(****)"), "{shown}");
    }
    assert_eq!(Secret::new(token).to_string(), "****");
    // On the wire it is the plain string.
    let frame = encode(&hello).unwrap();
    assert!(String::from_utf8_lossy(&frame).contains(&format!("\"token\":\"{token}\"")));
    assert_eq!(decode(&frame).unwrap().unwrap().0, hello);
}

#[test]
fn decode_errors_leave_string_values_out() {
    let token = "tok-\\\"3f9a1c";
    for body in [
        format!(
            r#"{{"type":"hello","agent_id":"a","namespace":"n","ips":[],"ports":"{token}","token":"{token}"}}"#
        ),
        format!(
            r#"{{"type":"hello","agent_id":"a","namespace":"n","ips":["{token}"],"ports":[],"token":"{token}"}}"#
        ),
        format!(r#"{{"type":"{token}"}}"#),
        format!(r#"["{token}"]"#),
        format!(r#"{{"type":"ping","nonce":1,"{token}":1}}"#),
        format!(
            r#"{{"type":"hello","agent_id":"a","namespace":"n","ips":[],"ports":[],"token":"t","token":"{token}"}}"#
        ),
    ] {
        let mut frame = vec![VERSION];
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        let err = decode(&frame).expect_err(&body).to_string();
        assert!(err.starts_with("malformed frame"), "{err}");
        assert!(!err.contains("3f9a1c"), "{body} → {err}");
    }
    let err = serde_json::from_str::<Vec<u8>>(r#""a\"b""#).unwrap_err();
    assert_eq!(redacted(&err), "invalid type: string … at line 1 column 6");
    let err = serde_json::from_str::<Hello>(r#"{"agent_id":"x"}"#).unwrap_err();
    assert_eq!(
        redacted(&err),
        "missing field `namespace` at line 1 column 16"
    );
}
