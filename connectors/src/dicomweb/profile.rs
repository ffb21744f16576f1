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

    /// A QIDO-RS value matching text that contains `needle`, when this
    /// backend matches wildcards case-insensitively (DICOM leaves that to
    /// the implementation; Orthanc does, most others do not).
    pub fn contains_pattern(self, needle: &str) -> Option<String> {
        match self {
            Profile::Orthanc => Some(format!("*{}*", self.exact_pattern(needle))),
            Profile::Generic | Profile::Gcp | Profile::Azure | Profile::Aws => None,
        }
    }

    /// A QIDO-RS value matching `value` exactly, as far as this backend can
    /// be told: Orthanc cannot receive a space in a query value (it does not
    /// decode `%20` or `+`), so there a space becomes the one-character
    /// wildcard `?` and the caller checks the returned value exactly.
    pub fn exact_pattern(self, value: &str) -> String {
        match self {
            Profile::Orthanc => value.replace(' ', "?"),
            Profile::Generic | Profile::Gcp | Profile::Azure | Profile::Aws => value.to_owned(),
        }
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

#[cfg(test)]
mod tests {
    use super::Profile;

    #[test]
    fn orthanc_gets_person_name_carets_raw_and_generic_gets_them_encoded() {
        assert_eq!(Profile::Orthanc.encode_value("Doe^John"), "Doe^John");
        assert_eq!(Profile::Generic.encode_value("Doe^John"), "Doe%5EJohn");
        assert_eq!(Profile::Generic.encode_value("1.2.3,1.2.4"), "1.2.3,1.2.4");
        assert_eq!(Profile::Generic.encode_value("a&b=c"), "a%26b%3Dc");
        assert_eq!(Profile::Orthanc.encode_value("a&b"), "a%26b");
    }

    #[test]
    fn orthanc_gets_spaces_as_single_character_wildcards() {
        assert_eq!(Profile::Orthanc.exact_pattern("LEFT KNEE"), "LEFT?KNEE");
        assert_eq!(
            Profile::Orthanc
                .contains_pattern("with contrast")
                .as_deref(),
            Some("*with?contrast*")
        );
        assert_eq!(Profile::Generic.contains_pattern("chest"), None);
    }
}
