//! Where in the file a problem is: spans of keys, line and column, and
//! "did you mean" suggestions for unknown keys.

use std::ops::Range;

use super::*;

pub(super) type Locate<'a> = dyn Fn(Option<Range<usize>>, String) -> ConfigError + 'a;

/// Adds the nearest expected name to serde's "unknown field `partner`,
/// expected one of `listen`, …, `partners`" ("did you mean `partners`?").
pub(super) fn suggest(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (edit_distance(unknown, name), name))
        .min();
    match nearest {
        Some((distance, name)) if distance <= unknown.len().max(2) / 2 => {
            format!("{message}; did you mean `{name}`?")
        }
        _ => message.to_owned(),
    }
}

/// Levenshtein distance over characters.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row.first().copied().unwrap_or_default();
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or_default();
            let left = row.get(j).copied().unwrap_or_default();
            let best = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(left + 1);
            diagonal = above;
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = best;
            }
        }
    }
    row.last().copied().unwrap_or_default()
}

/// One step of a path into a TOML document.
pub(super) enum Key<'a> {
    Name(&'a str),
    Index(usize),
}

/// The byte span of the value at `path`, if the document has one there.
pub(super) fn span_at(text: &str, path: &[Key<'_>]) -> Option<Range<usize>> {
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let mut item: &toml_edit::Item = document.as_item();
    for key in path {
        item = match key {
            Key::Name(name) => item.get(*name)?,
            Key::Index(index) => item.get(*index)?,
        };
    }
    item.span()
        .or_else(|| item.as_value().and_then(toml_edit::Value::span))
}

pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
