//! What one GraphQL request may ask for, measured on its fully expanded
//! form (every fragment counted where it is spread) before anything runs.
//!
//! The walk has a budget: it stops as soon as a limit is passed, so a
//! document built to explode (fragments spreading fragments) costs at most
//! `max_nodes` steps to refuse.

use async_graphql::Positioned;
use async_graphql::parser::types::{Directive, ExecutableDocument, Selection, SelectionSet};
use serde::Deserialize;

/// Limits on one request's document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryLimits {
    /// Nesting of selection sets.
    pub max_depth: usize,
    /// Fields and fragment spreads, all fragments expanded.
    pub max_nodes: usize,
    /// Aliased fields, all fragments expanded.
    pub max_aliases: usize,
    /// Fields at the root of one operation.
    pub max_root_fields: usize,
    /// Directives, all fragments expanded (only `@include` and `@skip`
    /// exist; each at most once where it is used).
    pub max_directives: usize,
    /// Fields that ask the partners (`imagingStudies`, `cohortCount`) in
    /// one request, aliases included: each is a fan-out to every partner.
    pub max_fan_outs: usize,
    /// Studies one request may ask for, summed over its `imagingStudies`
    /// fields' `first`.
    pub max_studies: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_depth: 12,
            max_nodes: 1000,
            max_aliases: 20,
            max_root_fields: 6,
            max_directives: 20,
            max_fan_outs: 4,
            max_studies: 500,
        }
    }
}

/// Why a document was refused; each has a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the query nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("the query asks for more than {0} fields once fragments are expanded")]
    TooComplex(usize),
    #[error("the query uses more than {0} aliases")]
    TooManyAliases(usize),
    #[error("an operation asks for more than {0} root fields")]
    TooManyRootFields(usize),
    #[error("fragment '{0}' spreads itself")]
    FragmentCycle(String),
    #[error("introspection is disabled")]
    Introspection,
    #[error("the query uses more than {0} directives")]
    TooManyDirectives(usize),
    #[error("directive '@{0}' is not known (only @include and @skip are)")]
    UnknownDirective(String),
    #[error("directive '@{0}' is repeated in one place")]
    RepeatedDirective(String),
}

impl LimitError {
    pub fn code(&self) -> &'static str {
        match self {
            LimitError::TooDeep(_) => "QUERY_TOO_DEEP",
            LimitError::TooComplex(_) | LimitError::FragmentCycle(_) => "QUERY_TOO_COMPLEX",
            LimitError::TooManyAliases(_) => "TOO_MANY_ALIASES",
            LimitError::TooManyRootFields(_) => "TOO_MANY_ROOT_FIELDS",
            LimitError::Introspection => "INTROSPECTION_DISABLED",
            LimitError::TooManyDirectives(_) => "TOO_MANY_DIRECTIVES",
            LimitError::UnknownDirective(_) | LimitError::RepeatedDirective(_) => {
                "INVALID_DIRECTIVE"
            }
        }
    }
}

/// Counts the directives of a document's text before it is parsed: each
/// `@` outside strings and comments. A document has at least as many
/// directives once its fragments are expanded, so more than
/// `max_directives` here is refused as it would be after parsing, but
/// without building the syntax tree of thousands of them.
pub fn scan(text: &str, limits: QueryLimits) -> Result<(), LimitError> {
    let mut directives = 0;
    let mut rest = text;
    while let Some(at) = rest.find(['@', '"', '#']) {
        let after = &rest[at..];
        rest = match after.as_bytes()[0] {
            b'@' => {
                directives += 1;
                if directives > limits.max_directives {
                    return Err(LimitError::TooManyDirectives(limits.max_directives));
                }
                &after[1..]
            }
            b'#' => after.find('\n').map_or("", |end| &after[end..]),
            _ if after.starts_with("\"\"\"") => {
                // A block string ends at the next unescaped `"""`.
                let body = &after[3..];
                let mut end = None;
                let mut from = 0;
                while let Some(i) = body[from..].find("\"\"\"") {
                    let i = from + i;
                    if i > 0 && body.as_bytes()[i - 1] == b'\\' {
                        from = i + 3;
                    } else {
                        end = Some(i + 3);
                        break;
                    }
                }
                end.map_or("", |end| &body[end..])
            }
            _ => {
                // A string ends at the next `"` not escaped.
                let body = &after[1..];
                let mut escaped = false;
                let end = body.char_indices().find_map(|(i, c)| {
                    let closes = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes.then_some(i + 1)
                });
                end.map_or("", |end| &body[end..])
            }
        };
    }
    Ok(())
}

struct Walk<'a> {
    document: &'a ExecutableDocument,
    limits: QueryLimits,
    introspection: bool,
    nodes: usize,
    aliases: usize,
    directives: usize,
    /// Fragments being expanded, to refuse cycles.
    expanding: Vec<&'a str>,
}

/// Checks every operation of `document` against `limits`; with
/// `introspection` false, `__schema` and `__type` are refused too
/// (`__typename` stays).
pub fn check(
    document: &ExecutableDocument,
    limits: QueryLimits,
    introspection: bool,
) -> Result<(), LimitError> {
    let mut walk = Walk {
        document,
        limits,
        introspection,
        nodes: 0,
        aliases: 0,
        directives: 0,
        expanding: Vec::new(),
    };
    for (_, operation) in document.operations.iter() {
        walk.directives(&operation.node.directives)?;
        for variable in &operation.node.variable_definitions {
            walk.directives(&variable.node.directives)?;
        }
        let roots = walk.selection_set(&operation.node.selection_set.node, 1)?;
        if roots > limits.max_root_fields {
            return Err(LimitError::TooManyRootFields(limits.max_root_fields));
        }
    }
    Ok(())
}

impl<'a> Walk<'a> {
    /// Counts the directives of one place; refuses unknown and repeated ones.
    fn directives(&mut self, directives: &[Positioned<Directive>]) -> Result<(), LimitError> {
        for (i, directive) in directives.iter().enumerate() {
            self.directives += 1;
            if self.directives > self.limits.max_directives {
                return Err(LimitError::TooManyDirectives(self.limits.max_directives));
            }
            let name = directive.node.name.node.as_str();
            if !matches!(name, "include" | "skip") {
                return Err(LimitError::UnknownDirective(
                    name.chars().take(64).collect(),
                ));
            }
            if directives[..i]
                .iter()
                .any(|earlier| earlier.node.name.node == directive.node.name.node)
            {
                return Err(LimitError::RepeatedDirective(name.to_owned()));
            }
        }
        Ok(())
    }

    /// Walks one selection set at `depth`; returns how many fields it
    /// selects directly (fragments expanded).
    fn selection_set(&mut self, set: &'a SelectionSet, depth: usize) -> Result<usize, LimitError> {
        if depth > self.limits.max_depth {
            return Err(LimitError::TooDeep(self.limits.max_depth));
        }
        let mut fields = 0;
        for item in &set.items {
            self.nodes += 1;
            if self.nodes > self.limits.max_nodes {
                return Err(LimitError::TooComplex(self.limits.max_nodes));
            }
            match &item.node {
                Selection::Field(field) => {
                    fields += 1;
                    self.directives(&field.node.directives)?;
                    let name = field.node.name.node.as_str();
                    if !self.introspection && (name == "__schema" || name == "__type") {
                        return Err(LimitError::Introspection);
                    }
                    if field.node.alias.is_some() {
                        self.aliases += 1;
                        if self.aliases > self.limits.max_aliases {
                            return Err(LimitError::TooManyAliases(self.limits.max_aliases));
                        }
                    }
                    if !field.node.selection_set.node.items.is_empty() {
                        self.selection_set(&field.node.selection_set.node, depth + 1)?;
                    }
                }
                Selection::InlineFragment(fragment) => {
                    self.directives(&fragment.node.directives)?;
                    fields += self.selection_set(&fragment.node.selection_set.node, depth)?;
                }
                Selection::FragmentSpread(spread) => {
                    self.directives(&spread.node.directives)?;
                    let name = spread.node.fragment_name.node.as_str();
                    if self.expanding.contains(&name) {
                        return Err(LimitError::FragmentCycle(name.to_owned()));
                    }
                    // An unknown fragment is the validator's to report.
                    let Some((key, definition)) = self.document.fragments.get_key_value(name)
                    else {
                        continue;
                    };
                    self.directives(&definition.node.directives)?;
                    self.expanding.push(key.as_str());
                    fields += self.selection_set(&definition.node.selection_set.node, depth)?;
                    self.expanding.pop();
                }
            }
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    fn checked(query: &str) -> Result<(), LimitError> {
        check(
            &async_graphql::parser::parse_query(query).unwrap(),
            QueryLimits::default(),
            false,
        )
    }

    #[test]
    fn an_ordinary_query_passes() {
        assert_eq!(
            checked(
                "query { me { subject } cohortCount(project: \"p\") { total partners { partner status } } }"
            ),
            Ok(())
        );
    }

    #[test]
    fn fragments_are_counted_where_they_are_spread() {
        // 10 spreads of a fragment of 10 spreads of a fragment of 20
        // fields: 2,000 fields, from a 1 KB document.
        let mut query = String::from("query { partners { ...a } }\nfragment a on Partner { ");
        query.push_str(&"...b ".repeat(10));
        query.push_str("}\nfragment b on Partner { ");
        query.push_str(&"...c ".repeat(10));
        query.push_str("}\nfragment c on Partner { ");
        query.push_str(&"id ".repeat(20));
        query.push('}');
        assert_eq!(checked(&query), Err(LimitError::TooComplex(1000)));
    }

    #[test]
    fn depth_aliases_and_root_fields_are_limited() {
        let deep = format!("{{ {}x{} }}", "a { ".repeat(13), " }".repeat(13));
        assert_eq!(checked(&deep), Err(LimitError::TooDeep(12)));
        let aliases: String = (0..21)
            .map(|n| format!("a{n}: me {{ subject }} "))
            .collect();
        assert_eq!(
            checked(&format!("{{ {aliases} }}")),
            Err(LimitError::TooManyAliases(20))
        );
        assert_eq!(
            checked(
                "{ a: me { subject } b: me { subject } c: me { subject } d: me { subject } e: me { subject } f: me { subject } g: me { subject } }"
            ),
            Err(LimitError::TooManyRootFields(6))
        );
        assert_eq!(
            checked("{ ...a } fragment a on QueryRoot { ...b } fragment b on QueryRoot { ...a }"),
            Err(LimitError::FragmentCycle("a".into()))
        );
        assert_eq!(
            checked("{ __typename x: __type(name: \"Partner\") { name } }"),
            Err(LimitError::Introspection)
        );
    }

    #[test]
    fn directives_are_counted_on_the_text_before_parsing_but_not_inside_strings() {
        let limits = QueryLimits::default();
        let many = format!(
            "{{ me {{ subject {} }} }}",
            "@include(if: true) ".repeat(10_000)
        );
        assert_eq!(scan(&many, limits), Err(LimitError::TooManyDirectives(20)));
        let in_strings = format!(
            "{{ x(a: \"{0}\\\" {0}\", b: \"\"\"{0}\\\"\"\" {0}\"\"\") # {0}\n }}",
            "@".repeat(30)
        );
        assert_eq!(scan(&in_strings, limits), Ok(()));
        assert_eq!(scan("{ me { subject @skip(if: false) } }", limits), Ok(()));
    }

    #[test]
    fn directives_are_counted_and_unknown_or_repeated_ones_refused() {
        // The amplification seen in the wild: one field, 10,000 @include.
        let repeated = format!(
            "{{ me {{ subject {} }} }}",
            "@include(if: true) ".repeat(10_000)
        );
        assert_eq!(
            checked(&repeated),
            Err(LimitError::RepeatedDirective("include".into()))
        );
        assert_eq!(
            checked("{ me { subject @include(if: true) @include(if: true) } }"),
            Err(LimitError::RepeatedDirective("include".into()))
        );
        assert_eq!(
            checked("{ me { subject @deprecated } }"),
            Err(LimitError::UnknownDirective("deprecated".into()))
        );
        assert_eq!(
            checked("query Q @whatever { me { subject } }"),
            Err(LimitError::UnknownDirective("whatever".into()))
        );
        assert_eq!(
            checked("{ me { subject @include(if: true) @skip(if: false) } }"),
            Ok(())
        );
        // Counted where a fragment is spread.
        let fragment = format!(
            "{{ me {{ {} }} }} fragment f on Principal {{ subject @skip(if: false) }}",
            "...f ".repeat(21)
        );
        assert_eq!(checked(&fragment), Err(LimitError::TooManyDirectives(20)));
    }
}
