//! Channel names and the grants that open them.
//!
//! Invariants: a valid name is 1–200 bytes of printable ASCII (`!`..`~`) without `*`, `,`,
//! `{` or `}`, so it can never collide with a grant pattern (`prefix*`) or with the hash tags the
//! gateway puts in its own Redis names. Grants are exact names or prefixes ending in one `*`.

/// Most channels one stream may ask for.
pub const MAX_CHANNELS_PER_STREAM: usize = 32;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 200;

/// Why a channel name is refused; the text goes back to the client as is.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("channel name is empty".into());
    }
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(format!(
            "channel name is {} bytes long; the limit is {MAX_CHANNEL_BYTES}",
            name.len()
        ));
    }
    if let Some(b) = name
        .bytes()
        .find(|b| !(b'!'..=b'~').contains(b) || matches!(b, b'*' | b',' | b'{' | b'}'))
    {
        return Err(format!(
            "channel name contains byte 0x{b:02x}; allowed: printable ASCII except space * , {{ }}"
        ));
    }
    Ok(())
}

/// The channel every user may read: `user:<sub>`.
pub fn personal_channel(sub: &str) -> String {
    format!("user:{sub}")
}

/// Whether any grant (exact name or `prefix*`) admits `channel`. A grant with a `*` anywhere
/// but once at its end is no prefix grant (found by fuzzing: `li**` used to open `li*…`).
pub fn granted(grants: &[String], channel: &str) -> bool {
    grants.iter().any(|g| match g.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => channel.starts_with(prefix),
        _ => g == channel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_star_inside_a_grant_makes_it_an_exact_name() {
        let grants = vec!["li**".to_string(), "a*b*".to_string(), "team:*".to_string()];
        assert!(!granted(&grants, "li*x"));
        assert!(!granted(&grants, "a*bc"));
        assert!(granted(&grants, "team:7"));
        assert!(granted(&["*".to_string()], "anything"));
    }

    #[test]
    fn names() {
        assert!(validate_name("orders").is_ok());
        assert!(validate_name("user:alice@example.com").is_ok());
        assert!(validate_name(&"a".repeat(200)).is_ok());
        for bad in ["", "a b", "a*", "a,b", "{a}", "é", "a\nb", &"a".repeat(201)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn grants() {
        let g = vec!["orders".to_string(), "team:7:*".to_string()];
        assert!(granted(&g, "orders"));
        assert!(!granted(&g, "orders2"));
        assert!(granted(&g, "team:7:chat"));
        assert!(!granted(&g, "team:8:chat"));
        assert!(granted(&["*".to_string()], "anything"));
        assert!(!granted(&[], "orders"));
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_accepts_only_the_alphabet(s in ".{0,300}") {
            if validate_name(&s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= 200);
                let allowed = s.bytes().all(|b| (b'!'..=b'~').contains(&b) && !b"*,{}".contains(&b));
                prop_assert!(allowed, "accepted {:?}", s);
            }
        }
    }
}
