//! Digest strings (`sha256:<lowercase hex>`) and the combination of several files' digests.

use std::collections::BTreeSet;

use aws_lc_rs::digest::{SHA256, digest};

use super::CompositeError;

const PREFIX: &str = "sha256:";

/// `sha256:<lowercase hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(digest(&SHA256, data)))
}

/// Checks that `value` is `sha256:` followed by 64 lowercase hex digits; `field` names it in
/// the error. Only sha256 is accepted: one algorithm keeps digests comparable for pinning.
pub fn validate_digest(field: &str, value: &str) -> Result<(), CompositeError> {
    let ok = value.strip_prefix(PREFIX).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(CompositeError::BadDigest {
            field: field.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// One digest for a set of files, binding each file's path to its content digest.
///
/// Format (see the module docs): SHA-256 over `<path>\0<digest>\n` per entry, entries in
/// byte-wise path order. Input order does not matter; a renamed file changes the result.
pub fn combine_file_digests<P: AsRef<str>, D: AsRef<str>>(
    files: &[(P, D)],
) -> Result<String, CompositeError> {
    let mut entries: Vec<(&str, &str)> = Vec::with_capacity(files.len());
    let mut seen = BTreeSet::new();
    for (path, content) in files {
        let (path, content) = (path.as_ref(), content.as_ref());
        if path.is_empty() || path.contains('\0') {
            return Err(CompositeError::BadPath(path.to_owned()));
        }
        if !seen.insert(path) {
            return Err(CompositeError::DuplicatePath(path.to_owned()));
        }
        validate_digest(&format!("digest of {path}"), content)?;
        entries.push((path, content));
    }
    entries.sort_unstable();
    let mut buf = Vec::new();
    for (path, content) in entries {
        buf.extend_from_slice(path.as_bytes());
        buf.push(0);
        buf.extend_from_slice(content.as_bytes());
        buf.push(b'\n');
    }
    Ok(sha256_digest(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> String {
        sha256_digest(s.as_bytes())
    }

    #[test]
    fn digest_format() {
        // FIPS 180-2 test vector.
        assert_eq!(
            sha256_digest(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(validate_digest("f", &d("x")).is_ok());
        let bad = [
            "",
            "sha256:",
            "sha512:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "SHA256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad0",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ag",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ];
        for v in bad {
            assert_eq!(
                validate_digest("config_digest", v),
                Err(CompositeError::BadDigest {
                    field: "config_digest".into(),
                    value: v.into()
                }),
                "{v:?}"
            );
        }
    }

    #[test]
    fn combination_is_order_independent_and_binds_paths() {
        let a = ("/etc/agent/prompt.md", d("You are a refund agent."));
        let b = ("/etc/agent/settings.yaml", d("temperature: 0"));
        let c = ("/etc/agent/tools.json", d("[]"));
        let one = combine_file_digests(&[a.clone(), b.clone(), c.clone()]).unwrap();
        let two = combine_file_digests(&[c.clone(), a.clone(), b.clone()]).unwrap();
        assert_eq!(one, two);
        let renamed =
            combine_file_digests(&[("/etc/agent/prompt.txt", a.1.clone()), b.clone(), c.clone()])
                .unwrap();
        assert_ne!(one, renamed);
        // Swapping contents between two paths changes it too.
        let swapped =
            combine_file_digests(&[(a.0, b.1.clone()), (b.0, a.1.clone()), c.clone()]).unwrap();
        assert_ne!(one, swapped);
        // A single file is still combined, so the path is bound.
        assert_ne!(combine_file_digests(std::slice::from_ref(&a)).unwrap(), a.1);
    }

    #[test]
    fn combination_matches_the_documented_bytes() {
        let a = d("a");
        let b = d("b");
        let expected = sha256_digest(format!("/x\0{a}\n/y\0{b}\n").as_bytes());
        assert_eq!(
            combine_file_digests(&[("/y", &b), ("/x", &a)]),
            Ok(expected)
        );
        // Pinned so that any change of format is a visible, deliberate break (checked with
        // `printf '%s\0%s\n' /x <a> /y <b> | sha256sum`).
        assert_eq!(
            combine_file_digests(&[("/y", &b), ("/x", &a)]).unwrap(),
            "sha256:5edf5f96b33f7a3dd46bddd83293c0d10a9081d7308b5090091ce5d4188debe4"
        );
        assert_eq!(
            combine_file_digests::<&str, &str>(&[]).unwrap(),
            sha256_digest(b"")
        );
    }

    #[test]
    fn combination_rejects_ambiguous_input() {
        let x = d("x");
        assert_eq!(
            combine_file_digests(&[("", &x)]),
            Err(CompositeError::BadPath(String::new()))
        );
        assert_eq!(
            combine_file_digests(&[("/a\0b", &x)]),
            Err(CompositeError::BadPath("/a\0b".into()))
        );
        assert_eq!(
            combine_file_digests(&[("/a", &x), ("/a", &x)]),
            Err(CompositeError::DuplicatePath("/a".into()))
        );
        assert!(matches!(
            combine_file_digests(&[("/a", "sha256:nope")]),
            Err(CompositeError::BadDigest { field, .. }) if field == "digest of /a"
        ));
    }
}
