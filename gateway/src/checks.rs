//! The `meshgate partners check` report: one row per partner.

use std::fmt::Write as _;

use meshgate_schema::{Capabilities, PagingStyle, ProbedFeature};

use crate::partner::PartnerCheck;

/// The report as an aligned text table, one partner per row.
pub fn table(checks: &[PartnerCheck]) -> String {
    let header = [
        "PARTNER",
        "KIND",
        "REACHABLE",
        "AUTHENTICATED",
        "LATENCY",
        "RESULT",
        "CAPABILITIES",
    ]
    .map(str::to_owned);
    let mut rows = vec![header];
    for check in checks {
        let connector = &check.partner.connector;
        rows.push([
            check.partner.id.clone(),
            format!("{:?}", connector.kind()).to_lowercase(),
            yes_no(Some(check.reachable())),
            yes_no(check.authenticated()),
            match &check.outcome {
                Ok(latency) => format!("{} ms", latency.as_millis()),
                Err(_) => "-".to_owned(),
            },
            match &check.outcome {
                Ok(_) => "OK".to_owned(),
                Err(failure) => failure.code().to_owned(),
            },
            describe(&connector.capabilities()),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or_default()
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn yes_no(value: Option<bool>) -> String {
    match value {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
    .to_owned()
}

/// Capabilities in one line: what is pushed down, how it pages, and what
/// the probe measured (`+` supported, `-` not, `?` could not tell).
pub fn describe(capabilities: &Capabilities) -> String {
    let filters: Vec<String> = capabilities
        .native_filters
        .iter()
        .map(|kind| kebab(&format!("{kind:?}")))
        .collect();
    let mut out = format!("push-down: {}", filters.join(","));
    let paging = match capabilities.paging {
        PagingStyle::None => "none",
        PagingStyle::LimitOffset => "limit/offset",
        PagingStyle::NextToken => "next-token",
    };
    let _ = write!(out, "; paging: {paging}");
    if let Some(size) = capabilities.max_page_size {
        let _ = write!(out, " <= {size}");
    }
    if let Some(cap) = capabilities.max_results {
        let _ = write!(out, "; at most {cap} results");
    }
    if capabilities.measured {
        let findings: Vec<String> = capabilities
            .probe
            .iter()
            .map(|finding| {
                let mark = match finding.supported {
                    Some(true) => '+',
                    Some(false) => '-',
                    None => '?',
                };
                let name = match finding.feature {
                    ProbedFeature::EmptyResultNoContent => "empty-as-204".to_owned(),
                    feature => kebab(&format!("{feature:?}")),
                };
                format!("{mark}{name}")
            })
            .collect();
        let _ = write!(out, "; measured: {}", findings.join(" "));
    } else {
        out.push_str("; declared");
    }
    out
}

/// `StudyLevelModality` -> `study-level-modality`.
fn kebab(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
