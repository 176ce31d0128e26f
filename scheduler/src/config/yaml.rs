//! A YAML document as a tree whose every node knows its line and column, built from
//! saphyr-parser's events, so that the config readers can point at the exact key or value
//! that is wrong.
//!
//! Scalars keep the text as written and whether they were plain (unquoted): each reader
//! decides what a scalar means for its field (a port wants a plain integer, an environment
//! value takes the text as written), rather than a schema guessing ahead (YAML 1.1 would turn
//! `restart: no` into `false`, and `ports: [80:80]` into a base-60 number).
//!
//! Anchors and aliases are expanded (with a bound on the nodes and on the bytes an expansion
//! may produce), and merge keys (`<<: *defaults`, common in compose files) are applied. The
//! work is linear in the size of the expanded document (keys are checked for duplicates with a
//! hash set), and nesting is bounded.

use std::collections::{HashMap, HashSet};

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::limits::MAX_CONFIG_EXPANDED_BYTES;

/// A position in the source text: line and column, both from 1 (columns count characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn of(span: &Span) -> Pos {
        Pos {
            line: span.start.line(),
            col: span.start.col() + 1,
        }
    }
}

/// A node of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Yaml {
    pub at: Pos,
    pub val: Val,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    /// `plain` is false for quoted and block scalars and for `!!str` ones: their text is
    /// never a number, a boolean or null.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Yaml>),
    /// Entries in document order; keys are unique (a repeated key is an error).
    Map(Vec<(Yaml, Yaml)>),
}

/// Why the text is not a YAML document we can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub at: Pos,
    pub message: String,
}

/// Nodes one document may expand to through aliases (a guard against "billion laughs").
const MAX_NODES: usize = 1_000_000;
/// How deeply collections may nest (the builder recurses once per level).
const MAX_DEPTH: usize = 200;
/// Bytes a node counts for, besides its scalar text, towards [`MAX_CONFIG_EXPANDED_BYTES`].
const NODE_BYTES: usize = 16;

impl Yaml {
    /// The scalar's text, if this is a scalar.
    pub fn scalar(&self) -> Option<&str> {
        match &self.val {
            Val::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Null: an empty plain scalar, `~` or `null` (YAML 1.2's core schema).
    pub fn is_null(&self) -> bool {
        matches!(&self.val, Val::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The value of `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key node and the value of `key` in a mapping.
    pub fn entry(&self, key: &str) -> Option<(&Yaml, &Yaml)> {
        match &self.val {
            Val::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.scalar() == Some(key))
                .map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// What kind of node this is, for messages: "a mapping", "a list", "the string \"x\"".
    pub fn describe(&self) -> String {
        match &self.val {
            Val::Map(_) => "a mapping".into(),
            Val::Seq(_) => "a list".into(),
            Val::Scalar { .. } if self.is_null() => "empty".into(),
            Val::Scalar { text, plain } => {
                if *plain && text.parse::<i64>().is_ok() {
                    format!("the number {text}")
                } else {
                    crate::limits::shown(text).to_string()
                }
            }
        }
    }

    /// The nodes of this tree and its bytes (scalar text plus [`NODE_BYTES`] a node): what a
    /// copy of it costs.
    fn weight(&self) -> Weight {
        match &self.val {
            Val::Scalar { text, .. } => Weight {
                nodes: 1,
                bytes: NODE_BYTES + text.len(),
            },
            Val::Seq(items) => items.iter().fold(Weight::ONE, |w, i| w.plus(i.weight())),
            Val::Map(entries) => entries
                .iter()
                .fold(Weight::ONE, |w, (k, v)| w.plus(k.weight()).plus(v.weight())),
        }
    }
}

/// What a tree costs: nodes and bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Weight {
    nodes: usize,
    bytes: usize,
}

impl Weight {
    const ONE: Weight = Weight {
        nodes: 1,
        bytes: NODE_BYTES,
    };

    fn plus(self, o: Weight) -> Weight {
        Weight {
            nodes: self.nodes.saturating_add(o.nodes),
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }
}

/// Parses `text` as one YAML document. An empty document (nothing but comments) is `None`.
pub fn parse(text: &str) -> Result<Option<Yaml>, SyntaxError> {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: Vec::new(),
        spent: Weight::default(),
        depth: 0,
    };
    builder.document()
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// anchor id -> the node it names and its weight (ids start from 1).
    anchors: Vec<Option<(Yaml, Weight)>>,
    /// Nodes and bytes built so far, copies of anchored nodes included.
    spent: Weight,
    /// Collections open around the current node.
    depth: usize,
}

enum Step {
    Node(Yaml),
    /// The end of the current sequence or mapping.
    End(Pos),
}

impl<'a> Builder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), SyntaxError> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(SyntaxError {
                at: Pos {
                    line: e.marker().line(),
                    col: e.marker().col() + 1,
                },
                message: e.info().to_string(),
            }),
            None => Err(SyntaxError {
                at: Pos::default(),
                message: "unexpected end of input".into(),
            }),
        }
    }

    fn document(&mut self) -> Result<Option<Yaml>, SyntaxError> {
        let mut doc = None;
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(doc),
                Event::DocumentStart(_) => {
                    if doc.is_some() {
                        return Err(SyntaxError {
                            at: Pos::of(&span),
                            message: "a second YAML document (`---`): the file must hold one"
                                .into(),
                        });
                    }
                    match self.node()? {
                        Step::Node(n) => doc = Some(n),
                        Step::End(at) => {
                            return Err(SyntaxError {
                                at,
                                message: "unexpected end of a collection".into(),
                            })
                        }
                    }
                }
                _ => {
                    return Err(SyntaxError {
                        at: Pos::of(&span),
                        message: "unexpected YAML event outside a document".into(),
                    })
                }
            }
        }
    }

    /// Counts `w` more towards the bounds on nodes and bytes; an error when it passes one.
    fn count(&mut self, w: Weight, at: Pos) -> Result<(), SyntaxError> {
        self.spent = self.spent.plus(w);
        if self.spent.nodes > MAX_NODES {
            return Err(SyntaxError {
                at,
                message: format!("the document expands to more than {MAX_NODES} nodes"),
            });
        }
        if self.spent.bytes > MAX_CONFIG_EXPANDED_BYTES {
            return Err(SyntaxError {
                at,
                message: format!(
                    "the document expands to more than {} MiB through its aliases; a config file \
                     may expand to at most that",
                    MAX_CONFIG_EXPANDED_BYTES >> 20
                ),
            });
        }
        Ok(())
    }

    /// Keeps a copy of an anchored node for its aliases (the copy counts, as an alias does).
    fn remember(&mut self, anchor: usize, node: &Yaml) -> Result<(), SyntaxError> {
        if anchor == 0 {
            return Ok(());
        }
        let w = node.weight();
        self.count(w, node.at)?;
        if self.anchors.len() <= anchor {
            self.anchors.resize(anchor + 1, None);
        }
        self.anchors[anchor] = Some((node.clone(), w));
        Ok(())
    }

    /// Enters a collection; an error when they nest too deeply.
    fn enter(&mut self, at: Pos) -> Result<(), SyntaxError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(SyntaxError {
                at,
                message: format!("collections nest more than {MAX_DEPTH} deep"),
            });
        }
        Ok(())
    }

    fn node(&mut self) -> Result<Step, SyntaxError> {
        let (ev, span) = self.next()?;
        let at = Pos::of(&span);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag
                    .as_ref()
                    .is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                self.count(
                    Weight {
                        nodes: 1,
                        bytes: NODE_BYTES + text.len(),
                    },
                    at,
                )?;
                let node = Yaml {
                    at,
                    val: Val::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain && !is_str_tag,
                    },
                };
                self.remember(anchor, &node)?;
                Ok(Step::Node(node))
            }
            Event::Alias(id) => {
                let Some(Some((_, w))) = self.anchors.get(id) else {
                    return Err(SyntaxError {
                        at,
                        message: "an alias to an anchor that is not defined before it".into(),
                    });
                };
                // Counted before it is copied: a bomb is refused before it takes the memory.
                self.count(*w, at)?;
                let Some(Some((target, _))) = self.anchors.get(id) else {
                    unreachable!("looked up just above");
                };
                // The copy points at the alias, where the reader of an error will look.
                Ok(Step::Node(Yaml {
                    at,
                    val: target.val.clone(),
                }))
            }
            Event::SequenceStart(anchor, _) => {
                self.count(Weight::ONE, at)?;
                self.enter(at)?;
                let mut items = Vec::new();
                while let Step::Node(n) = self.node()? {
                    items.push(n);
                }
                self.depth -= 1;
                let node = Yaml {
                    at,
                    val: Val::Seq(items),
                };
                self.remember(anchor, &node)?;
                Ok(Step::Node(node))
            }
            Event::MappingStart(anchor, _) => {
                self.count(Weight::ONE, at)?;
                self.enter(at)?;
                let node = self.mapping(at)?;
                self.depth -= 1;
                self.remember(anchor, &node)?;
                Ok(Step::Node(node))
            }
            Event::SequenceEnd | Event::MappingEnd => Ok(Step::End(at)),
            _ => Err(SyntaxError {
                at,
                message: "unexpected YAML event inside a document".into(),
            }),
        }
    }

    fn mapping(&mut self, at: Pos) -> Result<Yaml, SyntaxError> {
        let mut entries: Vec<(Yaml, Yaml)> = Vec::new();
        // Each key written in this mapping, and the line it is first written on.
        let mut lines: HashMap<String, usize> = HashMap::new();
        let mut merged = Merged::default();
        while let Step::Node(key) = self.node()? {
            let value = match self.node()? {
                Step::Node(v) => v,
                Step::End(end) => {
                    return Err(SyntaxError {
                        at: end,
                        message: "a mapping key without a value".into(),
                    })
                }
            };
            let Val::Scalar { text, plain } = &key.val else {
                return Err(SyntaxError {
                    at: key.at,
                    message: format!("a key must be a plain string, not {}", key.describe()),
                });
            };
            if *plain && text == "<<" {
                merge_into(&mut merged, value)?;
                continue;
            }
            if let Some(first) = lines.get(text.as_str()) {
                return Err(SyntaxError {
                    at: key.at,
                    message: format!(
                        "the key {} appears twice in this mapping (first at line {first})",
                        crate::limits::shown(text)
                    ),
                });
            }
            lines.insert(text.clone(), key.at.line);
            entries.push((key, value));
        }
        // Keys written in the mapping win over merged ones; among merged mappings the first wins.
        for (k, v) in merged.entries {
            if k.scalar().is_none_or(|k| !lines.contains_key(k)) {
                entries.push((k, v));
            }
        }
        Ok(Yaml {
            at,
            val: Val::Map(entries),
        })
    }
}

/// The entries merge keys bring into a mapping, each key once.
#[derive(Default)]
struct Merged {
    entries: Vec<(Yaml, Yaml)>,
    /// Scalar keys in `entries`.
    keys: HashSet<String>,
}

/// `<<: *a` or `<<: [*a, *b]`: the entries to merge, earlier ones first.
fn merge_into(merged: &mut Merged, value: Yaml) -> Result<(), SyntaxError> {
    let sources = match value.val {
        Val::Map(_) => vec![value],
        Val::Seq(items) => items,
        Val::Scalar { .. } => {
            return Err(SyntaxError {
                at: value.at,
                message: "a merge key `<<` takes a mapping or a list of mappings".into(),
            })
        }
    };
    for source in sources {
        let Val::Map(entries) = source.val else {
            return Err(SyntaxError {
                at: source.at,
                message: "a merge key `<<` takes a mapping or a list of mappings".into(),
            });
        };
        for (k, v) in entries {
            // Keys of a mapping are scalars (the builder refuses others).
            let fresh = match k.scalar() {
                Some(text) => merged.keys.insert(text.to_string()),
                None => true,
            };
            if fresh {
                merged.entries.push((k, v));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Yaml {
        parse(text).unwrap().unwrap()
    }

    #[test]
    fn positions_are_one_based() {
        let y = doc("\"version\": 1\n\"nodes\":\n  \"a\": [\"x\", y]\n");
        let (k, v) = y.entry("nodes").unwrap();
        assert_eq!(k.at, Pos { line: 2, col: 1 });
        let (ka, va) = v.entry("a").unwrap();
        assert_eq!(ka.at, Pos { line: 3, col: 3 });
        let Val::Seq(items) = &va.val else { panic!() };
        assert_eq!(items[0].at, Pos { line: 3, col: 9 });
        assert_eq!(items[1].at, Pos { line: 3, col: 14 });
        assert_eq!(
            items[1].val,
            Val::Scalar {
                text: "y".into(),
                plain: true
            }
        );
        assert_eq!(
            items[0].val,
            Val::Scalar {
                text: "x".into(),
                plain: false
            }
        );
    }

    #[test]
    fn empty_documents_are_none() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# nothing\n").unwrap(), None);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.at, Pos { line: 3, col: 1 });
        assert_eq!(
            e.message,
            "the key \"a\" appears twice in this mapping (first at line 1)"
        );
    }

    #[test]
    fn aliases_and_merge_keys() {
        let y = doc("base: &b {image: x, mem_limit: 5}\nweb:\n  <<: *b\n  mem_limit: 7\n");
        let web = y.get("web").unwrap();
        assert_eq!(web.get("image").unwrap().scalar(), Some("x"));
        assert_eq!(web.get("mem_limit").unwrap().scalar(), Some("7"));
    }

    #[test]
    fn two_documents_are_an_error() {
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.at.line, 2);
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.at.line >= 1, "{e:?}");
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("more than"), "{e:?}");
    }

    /// The bomb: a 10 KB scalar, aliased 10 times per level over 5 levels (100,000
    /// copies, 1 GB) in a file of about 10 KB: refused at once, before the memory is taken.
    #[test]
    fn alias_bombs_of_bytes_are_refused_quickly() {
        let mut text = format!("s: &a0 \"{}\"\n", "x".repeat(10_000));
        for i in 1..=5 {
            let p = i - 1;
            let items = vec![format!("*a{p}"); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{items}]\n"));
        }
        assert!(text.len() < 11_000);
        let start = std::time::Instant::now();
        let e = parse(&text).unwrap_err();
        let took = start.elapsed();
        assert!(e.message.contains("MiB through its aliases"), "{e:?}");
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        // Under the node bound all along: only the bytes bound catches it.
        const { assert!(100_000 < MAX_NODES) };
    }

    #[test]
    fn deep_nesting_is_refused() {
        // Refused (by saphyr's own recursion limit or by ours), without overflowing the stack.
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = parse(&text).unwrap_err();
        assert!(
            e.message.contains("nest more than") || e.message.contains("recursion limit"),
            "{e:?}"
        );
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&" ".repeat(i));
            text.push_str("- \n");
        }
        assert!(parse(&text).is_err());
    }

    /// Parsing is linear in mapping keys: 4 MB of keys takes about 8 times as long as 512 KB
    /// (quadratic would be 64 times).
    #[test]
    fn many_keys_parse_in_linear_time() {
        let doc = |bytes: usize| {
            let mut t = String::with_capacity(bytes + 32);
            let mut i = 0;
            while t.len() < bytes {
                t.push_str(&format!("key{i:08}: v\n"));
                i += 1;
            }
            t
        };
        let time = |text: &str| {
            // The best of three, against a busy machine.
            (0..3)
                .map(|_| {
                    let start = std::time::Instant::now();
                    let y = parse(text).unwrap().unwrap();
                    assert!(matches!(&y.val, Val::Map(e) if e.len() > 30_000));
                    start.elapsed()
                })
                .min()
                .unwrap()
        };
        let small = time(&doc(512 << 10));
        let large = time(&doc(4 << 20));
        let ratio = large.as_secs_f64() / small.as_secs_f64();
        assert!(
            ratio < 24.0,
            "512 KB: {small:?}, 4 MB: {large:?}, ratio {ratio:.1}"
        );
    }

    #[test]
    fn merge_keys_keep_their_rules() {
        let y = doc("a: &a {x: 1, y: 2}\nb: &b {y: 3, z: 4}\nc:\n  <<: [*a, *b]\n  x: 0\n");
        let c = y.get("c").unwrap();
        let keys: Vec<_> = match &c.val {
            Val::Map(e) => e
                .iter()
                .map(|(k, v)| (k.scalar().unwrap(), v.scalar().unwrap()))
                .collect(),
            _ => panic!(),
        };
        assert_eq!(keys, [("x", "0"), ("y", "2"), ("z", "4")]);
    }
}
