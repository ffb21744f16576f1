//! What differs between DICOMweb backends.

use std::time::Duration;

use serde::Deserialize;

/// A DICOMweb backend's quirks. Where the capability probe
/// (`probe.rs`) measures a behaviour, the measurement overrides what is
/// assumed here; these assumptions hold until a probe has run, and for what
/// a probe could not tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Any QIDO-RS service that follows PS3.18: query values percent-encoded.
    #[default]
    Generic,
    /// Orthanc with its DICOMweb plugin: it does not percent-decode query
    /// values, matches wildcards case-insensitively and matches
    /// comma-separated lists of modalities.
    Orthanc,
    /// Google Cloud Healthcare API DICOM stores: OAuth2 bearer tokens,
    /// `limit` up to 5,000 (default 100), no total count.
    Gcp,
    /// Azure Health Data Services DICOM service (API v2): Entra ID tokens,
    /// `limit` 1–200 (outside: 400), `204` for no results, pages that may
    /// repeat rows.
    Azure,
    /// AWS HealthImaging's DICOMweb API: SigV4-signed (`medical-imaging`),
    /// at most 10,000 records per search.
    Aws,
}

impl Profile {
    pub fn default_page_size(self) -> u32 {
        match self {
            Profile::Generic => 100,
            Profile::Orthanc => 1000,
            Profile::Gcp => 1000,
            Profile::Azure => 200,
            Profile::Aws => 1000,
        }
    }

    /// The largest `limit` the backend accepts (more is refused or cut).
    pub fn max_page_size(self) -> u32 {
        match self {
            Profile::Generic => 1000,
            Profile::Orthanc => 10_000,
            Profile::Gcp => 5000,
            Profile::Azure => 200,
            Profile::Aws => 1000,
        }
    }

    /// How long an idle pooled connection is kept for reuse: shorter than
    /// the backend's own keep-alive timeout, so the client does not send on
    /// a connection the server is closing. Orthanc (CivetWeb) closes idle
    /// connections after about 0.5 s (measured on 1.10.1); common web
    /// servers in front of other archives after 5 s.
    pub fn idle_timeout(self) -> Duration {
        match self {
            Profile::Generic | Profile::Gcp | Profile::Azure | Profile::Aws => {
                Duration::from_secs(4)
            }
            Profile::Orthanc => Duration::from_millis(250),
        }
    }

    /// The most results one search may return, if the backend caps them.
    pub fn max_results(self) -> Option<u32> {
        match self {
            Profile::Aws => Some(10_000),
            _ => None,
        }
    }

    /// Whether `ModalitiesInStudy` can be combined with `offset` paging.
    /// Orthanc 1.10 / DICOMweb 1.7 return nothing past the first page when
    /// it is (measured), so there modality is asked at series level.
    pub fn pages_modalities_in_study(self) -> bool {
        !matches!(self, Profile::Orthanc)
    }

    /// Whether `ModalitiesInStudy=CT,MR` / `Modality=CT,MR` match either.
    pub fn modality_lists(self) -> bool {
        matches!(self, Profile::Orthanc)
    }

    /// Whether `StudyInstanceUID=a,b` is assumed, until the probe measures
    /// it, to match either UID. List of UID matching is standard (PS3.4
    /// C.2.2.2.2) and Orthanc does it (measured); Google's DICOMweb
    /// conformance lists UID lists as unsupported, and Azure's v2
    /// conformance matches a UID as one value (a list finds nothing: 204);
    /// HealthImaging's QIDO-RS documentation does not list them.
    pub fn uid_lists(self) -> bool {
        matches!(self, Profile::Orthanc | Profile::Generic)
    }

    /// Whether `ModalitiesInStudy` is assumed, until the probe measures it,
    /// to be a study-level match key. Google's documented study-level keys
    /// do not include it.
    pub fn study_level_modality(self) -> bool {
        !matches!(self, Profile::Gcp)
    }

    /// Whether `PatientSex` may be sent as a match key. Not a required
    /// QIDO-RS key (PS3.18 table 10.6.1-5), absent from the searchable
    /// attributes of Google's, Azure's (v2: answered `400`) and
    /// HealthImaging's documentation; Orthanc matches it (measured).
    /// Elsewhere it is checked on what comes back.
    pub fn searches_patient_sex(self) -> bool {
        matches!(self, Profile::Orthanc | Profile::Generic)
    }

    /// Whether `BodyPartExamined` may be sent as a series-level match key:
    /// not in Google's, Azure's (`400`) or HealthImaging's searchable
    /// series attributes; Orthanc matches it (measured).
    pub fn searches_body_part(self) -> bool {
        matches!(self, Profile::Orthanc | Profile::Generic)
    }

    /// Whether series-level answers carry `BodyPartExamined`: Azure's v2
    /// conformance does not return it there (nor at instance level), so on
    /// an Azure partner the body parts of a body-part cohort's candidate
    /// series are read from instance metadata (WADO-RS).
    pub fn returns_series_body_part(self) -> bool {
        !matches!(self, Profile::Azure)
    }

    /// Whether the backend is assumed, until the probe measures it, to
    /// match `*` wildcards case-insensitively (DICOM leaves case to the
    /// implementation; Orthanc 1.10 does, measured, for every VR but PN).
    pub fn case_insensitive_wildcards(self) -> bool {
        matches!(self, Profile::Orthanc)
    }

    /// Encodes one query value for the URL. Commas stay raw everywhere:
    /// QIDO-RS uses them to separate list values. Orthanc does not
    /// percent-decode query values, so `^` goes raw there.
    pub fn encode_value(self, value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        for byte in value.bytes() {
            let raw = byte.is_ascii_alphanumeric()
                || matches!(byte, b'-' | b'.' | b'_' | b'~' | b',' | b'*' | b'?')
                || (self == Profile::Orthanc && byte == b'^');
            if raw {
                out.push(char::from(byte));
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
        out
    }
}

/// How a text filter matches stored values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextMatch {
    /// The whole value, ignoring case.
    Exact,
    /// A substring of it, ignoring case.
    Contains,
}

/// A QIDO-RS wildcard pattern that matches at least every stored value
/// `value` matches — never fewer — for a backend measured to match `*`
/// case-insensitively; the caller checks the returned values exactly.
///
/// Only ASCII letters, digits and `-._~` are sent as they are: those reach
/// every backend unchanged. Any other character — reserved ones
/// (`/ & = + % # ? \` and space), wildcards typed by a caller, non-ASCII
/// letters — is sent as `*`: Orthanc does not percent-decode query values
/// (so `PET%2FCT` matches nothing there), `\` separates DICOM list values,
/// and how a backend matches a multi-byte character against `?` is not
/// known. `None` when the pattern would match everything (nothing to push
/// down).
pub fn wildcard_pattern(value: &str, how: TextMatch) -> Option<String> {
    let mut pattern = String::with_capacity(value.len() + 2);
    if how == TextMatch::Contains {
        pattern.push('*');
    }
    for c in value.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
            pattern.push(c);
        } else if !pattern.ends_with('*') {
            pattern.push('*');
        }
    }
    if how == TextMatch::Contains && !pattern.ends_with('*') {
        pattern.push('*');
    }
    pattern.chars().any(|c| c != '*').then_some(pattern)
}

#[cfg(test)]
mod tests {
    use super::{Profile, TextMatch, wildcard_pattern};

    #[test]
    fn orthanc_gets_person_name_carets_raw_and_generic_gets_them_encoded() {
        assert_eq!(Profile::Orthanc.encode_value("Doe^John"), "Doe^John");
        assert_eq!(Profile::Generic.encode_value("Doe^John"), "Doe%5EJohn");
        assert_eq!(Profile::Generic.encode_value("1.2.3,1.2.4"), "1.2.3,1.2.4");
        assert_eq!(Profile::Generic.encode_value("a&b=c"), "a%26b%3Dc");
        assert_eq!(Profile::Orthanc.encode_value("a&b"), "a%26b");
    }

    #[test]
    fn characters_a_backend_may_not_receive_intact_become_wildcards() {
        let contains = |v| wildcard_pattern(v, TextMatch::Contains);
        assert_eq!(contains("pet/ct").as_deref(), Some("*pet*ct*"));
        assert_eq!(contains("ct chest w/o").as_deref(), Some("*ct*chest*w*o*"));
        assert_eq!(contains("übersicht").as_deref(), Some("*bersicht*"));
        assert_eq!(
            contains("a&b=c+d%e#f?g\\h").as_deref(),
            Some("*a*b*c*d*e*f*g*h*")
        );
        assert_eq!(
            contains("***").as_deref(),
            None,
            "typed wildcards match literally"
        );
        assert_eq!(contains("//").as_deref(), None);
        assert_eq!(
            wildcard_pattern("LEFT KNEE", TextMatch::Exact).as_deref(),
            Some("LEFT*KNEE")
        );
        assert_eq!(
            wildcard_pattern("CHEST", TextMatch::Exact).as_deref(),
            Some("CHEST")
        );
    }
}
