//! A small, strict reader of Prometheus text exposition 0.0.4 for tests: every line must be a
//! comment (`# HELP`, `# TYPE`), blank, or a sample `name{k="v",...} value`; anything else panics.
//! Included with `#[path]` so the tests need no shared `mod.rs`.
#![allow(dead_code)]

use std::collections::HashMap;

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Labels in exposition order.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// `# TYPE` per family name.
    pub types: HashMap<String, String>,
    /// `# HELP` per family name.
    pub helps: HashMap<String, String>,
}

impl Exposition {
    /// Every sample of family `name`.
    pub fn family(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the sample of `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matches: Vec<&Sample> = self
            .family(name)
            .into_iter()
            .filter(|s| labels.iter().all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v)))
            .collect();
        assert!(matches.len() <= 1, "{name} {labels:?} matches {matches:?}");
        matches.first().map(|s| s.value)
    }
}

/// Parses `text`, panicking on anything that is not valid exposition.
pub fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(out.helps.insert(name.into(), help.into()).is_none(), "second HELP for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE without a type");
            assert!(out.types.insert(name.into(), ty.into()).is_none(), "second TYPE for {name}");
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        out.samples.push(parse_sample(line));
    }
    out
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value in {line:?}"));
    let name = &line[..name_end];
    assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line:?}"
    );
    let mut labels = Vec::new();
    let mut chars = line[name_end..].chars().peekable();
    if chars.peek() == Some(&'{') {
        chars.next();
        loop {
            if chars.peek() == Some(&'}') {
                chars.next();
                break;
            }
            let mut key = String::new();
            for c in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            assert_eq!(chars.next(), Some('"'), "label {key} unquoted in {line:?}");
            let mut value = String::new();
            loop {
                match chars.next().unwrap_or_else(|| panic!("open quote in {line:?}")) {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
            match chars.next() {
                Some(',') => {}
                Some('}') => break,
                other => panic!("unexpected {other:?} after a label in {line:?}"),
            }
        }
    }
    let rest: String = chars.collect();
    let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("no space before the value in {line:?}"));
    assert!(!value.contains(' '), "timestamp or junk in {line:?}");
    let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
    Sample { name: name.into(), labels, value }
}
