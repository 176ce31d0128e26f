//! A YAML document as a tree whose every node knows its line and column, built from
//! saphyr-parser's events, so that the config readers can point at the exact key or value
//! that is wrong.
//!
//! Scalars keep the text as written and whether they were plain (unquoted): each reader
//! decides what a scalar means for its field (a port wants a plain integer, an environment
//! value takes the text as written), rather than a schema guessing ahead (YAML 1.1 would turn
//! `restart: no` into `false`, and `ports: [80:80]` into a base-60 number).
//!
//! Anchors and aliases are expanded (with a bound on the nodes an expansion may produce),
//! and merge keys (`<<: *defaults`, common in compose files) are applied.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

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
                    format!("{text:?}")
                }
            }
        }
    }

    fn size(&self) -> usize {
        match &self.val {
            Val::Scalar { .. } => 1,
            Val::Seq(items) => 1 + items.iter().map(Yaml::size).sum::<usize>(),
            Val::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.size() + v.size())
                    .sum::<usize>()
            }
        }
    }
}

/// Parses `text` as one YAML document. An empty document (nothing but comments) is `None`.
pub fn parse(text: &str) -> Result<Option<Yaml>, SyntaxError> {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: Vec::new(),
        nodes: 0,
    };
    builder.document()
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    /// anchor id -> the node it names (ids start from 1).
    anchors: Vec<Option<Yaml>>,
    nodes: usize,
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

    fn count(&mut self, n: usize, at: Pos) -> Result<(), SyntaxError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                at,
                message: format!("the document expands to more than {MAX_NODES} nodes"),
            });
        }
        Ok(())
    }

    fn remember(&mut self, anchor: usize, node: &Yaml) {
        if anchor == 0 {
            return;
        }
        if self.anchors.len() <= anchor {
            self.anchors.resize(anchor + 1, None);
        }
        self.anchors[anchor] = Some(node.clone());
    }

    fn node(&mut self) -> Result<Step, SyntaxError> {
        let (ev, span) = self.next()?;
        let at = Pos::of(&span);
        self.count(1, at)?;
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag
                    .as_ref()
                    .is_some_and(|t| t.is_yaml_core_schema() && t.suffix == "str");
                let node = Yaml {
                    at,
                    val: Val::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain && !is_str_tag,
                    },
                };
                self.remember(anchor, &node);
                Ok(Step::Node(node))
            }
            Event::Alias(id) => {
                let Some(Some(target)) = self.anchors.get(id).cloned() else {
                    return Err(SyntaxError {
                        at,
                        message: "an alias to an anchor that is not defined before it".into(),
                    });
                };
                self.count(target.size(), at)?;
                // The copy points at the alias, where the reader of an error will look.
                Ok(Step::Node(Yaml { at, ..target }))
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                while let Step::Node(n) = self.node()? {
                    items.push(n);
                }
                let node = Yaml {
                    at,
                    val: Val::Seq(items),
                };
                self.remember(anchor, &node);
                Ok(Step::Node(node))
            }
            Event::MappingStart(anchor, _) => {
                let node = self.mapping(at)?;
                self.remember(anchor, &node);
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
        let mut merged: Vec<(Yaml, Yaml)> = Vec::new();
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
            if let Some((first, _)) = entries.iter().find(|(k, _)| k.scalar() == Some(text)) {
                return Err(SyntaxError {
                    at: key.at,
                    message: format!(
                        "the key {text:?} appears twice in this mapping (first at line {})",
                        first.at.line
                    ),
                });
            }
            entries.push((key, value));
        }
        // Keys written in the mapping win over merged ones; among merged mappings the first wins.
        for (k, v) in merged {
            if !entries.iter().any(|(e, _)| e.scalar() == k.scalar()) {
                entries.push((k, v));
            }
        }
        Ok(Yaml {
            at,
            val: Val::Map(entries),
        })
    }
}

/// `<<: *a` or `<<: [*a, *b]`: the entries to merge, earlier ones first.
fn merge_into(merged: &mut Vec<(Yaml, Yaml)>, value: Yaml) -> Result<(), SyntaxError> {
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
            if !merged.iter().any(|(m, _)| m.scalar() == k.scalar()) {
                merged.push((k, v));
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
}
