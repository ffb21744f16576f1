//! What differs between DICOMweb backends.

use serde::Deserialize;

/// A DICOMweb backend's quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Any QIDO-RS service that follows PS3.18: query values percent-encoded.
    #[default]
    Generic,
    /// Orthanc with its DICOMweb plugin. It does not percent-decode query
    /// values, so `^` and spaces go raw, and it matches comma-separated
    /// lists of Modalities in Study.
    Orthanc,
}

impl Profile {
    pub fn default_page_size(self) -> u32 {
        match self {
            Profile::Generic => 100,
            Profile::Orthanc => 1000,
        }
    }

    pub fn max_page_size(self) -> u32 {
        match self {
            Profile::Generic => 1000,
            Profile::Orthanc => 10_000,
        }
    }

    /// The most results one search may return, if the backend caps them.
    pub fn max_results(self) -> Option<u32> {
        None
    }

    /// Whether `ModalitiesInStudy=CT,MR` matches studies with either.
    pub fn modality_lists(self) -> bool {
        matches!(self, Profile::Orthanc)
    }

    /// Encodes one query value for the URL. Commas stay raw everywhere: QIDO-RS
    /// uses them to separate list values.
    pub fn encode_value(self, value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        for byte in value.bytes() {
            let raw = byte.is_ascii_alphanumeric()
                || matches!(byte, b'-' | b'.' | b'_' | b'~' | b',' | b'*' | b'?')
                || (self == Profile::Orthanc && byte == b'^');
            if raw {
                out.push(char::from(byte));
            } else if self == Profile::Orthanc && byte == b' ' {
                // Orthanc reads `%20` literally; a space must reach it as one,
                // which a URL can only carry as `+` — which it does decode.
                out.push('+');
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
}
