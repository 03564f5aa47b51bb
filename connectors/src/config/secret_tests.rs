//! Values of keys that hold secrets (`password`, `token`, `url` with its credentials,
//! `headers` with their tokens) never appear in a config error, which `connect` and `serve
//! --connect` print on stderr (and so into journald) and `--check` on stdout: serde's type
//! errors quote the value they refuse (``invalid type: integer `123456` ``), so these keys'
//! values are replaced with `<hidden>`. Errors of other keys keep their values: they help.

use super::*;

fn error(text: &str) -> ConfigError {
    ConnectFile::parse(text, "p.toml").expect_err("refused")
}

const SOURCE: &str = "[source]\nnode = \"127.0.0.1:7400\"\n";

#[test]
fn a_type_error_of_a_secret_key_names_the_key_but_not_the_value() {
    let cases = [
        (
            "[sink]\nkind = \"nats\"\nuser = \"app\"\npassword = 123456\n",
            "123456",
            "password",
        ),
        (
            "[sink]\nkind = \"nats\"\ntoken = 987654321\n",
            "987654321",
            "token",
        ),
        (
            "[sink]\nkind = \"webhook\"\nurl = \"http://h/x\"\nposition_file = \"p\"\n\
             headers = { Authorization = 424242 }\n",
            "424242",
            "Authorization",
        ),
        (
            "[sink]\nkind = \"webhook\"\nurl = \"http://h/x\"\nposition_file = \"p\"\n\
             headers = \"Bearer s3cret-t0ken\"\n",
            "s3cret-t0ken",
            "headers",
        ),
        ("[sink]\nkind = \"postgres\"\nurl = true\n", "true", "url"),
        ("[sink]\nkind = \"redis\"\nurl = 1.5e3\n", "1500", "url"),
    ];
    for (sink, value, key) in cases {
        let e = error(&format!("{SOURCE}{sink}"));
        let m = e.to_string();
        assert!(
            !m.contains(value),
            "the error shows the secret {value:?}: {m}"
        );
        assert!(m.contains(key), "the error names the key {key:?}: {m}");
        assert!(m.contains("<hidden>"), "says a value was left out: {m}");
        assert!(m.contains("expected"), "still says what was expected: {m}");
        assert_eq!(e.line, sink.lines().count() + 2, "{m}");
    }
    // In a [[pipeline]] table too.
    let e = error(
        "[[pipeline]]\nname = \"a\"\n[pipeline.source]\nnode = \"h:1\"\n[pipeline.sink]\n\
         kind = \"nats\"\nuser = \"app\"\npassword = 123456\n",
    );
    assert!(!e.to_string().contains("123456"), "{e}");
}

#[test]
fn a_type_error_of_another_key_keeps_its_value() {
    let e = error(&format!(
        "{SOURCE}[sink]\nkind = \"postgres\"\nurl = \"postgres://h/db\"\nconnect_timeout_ms = \
         \"soon\"\n"
    ));
    assert!(e.message.contains("\"soon\""), "{e}");
}

/// A sink URL a sink refuses (`tls://` for NATS, `https://` for the webhook) is named in the
/// error `connect --check` prints, without its user info or query.
#[test]
fn a_refused_sink_url_is_shown_without_its_credentials() {
    for (sink, shown) in [
        (
            "kind = \"nats\"\nurl = \"tls://app:s3cret@nats:4222\"\n",
            "tls://nats:4222",
        ),
        (
            "kind = \"webhook\"\nurl = \"https://app:s3cret@hooks.example/x?token=s3cret\"\n\
             position_file = \"p\"\n",
            "https://hooks.example/x",
        ),
    ] {
        let f = ConnectFile::parse(&format!("{SOURCE}[sink]\n{sink}"), "p.toml").unwrap();
        let e = f.pipelines[0].sink().err().expect("refused");
        let m = e.to_string();
        assert!(!m.contains("s3cret"), "{m}");
        assert!(m.contains(shown), "names the URL as describe() would: {m}");
    }
}

/// A message about a secret key that quotes no value (an unknown or missing key) stays whole.
#[test]
fn a_misplaced_secret_key_is_still_named_as_unknown() {
    let e = error(&format!("{SOURCE}[sink]\nkind = \"file\"\nurl = \"x\"\n"));
    assert!(e.message.contains("unknown field `url`"), "{e}");
}
