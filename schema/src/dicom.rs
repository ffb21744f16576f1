//! DICOM attributes as the domain reads them, from either DICOM JSON
//! (PS3.18 F.2, what QIDO-RS returns) or a parsed Part-10 data set.

use serde_json::Value;
use time::{Date, Month, Time, UtcOffset};

/// A DICOM attribute tag (group, element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(pub u16, pub u16);

impl Tag {
    /// The tag as DICOM JSON writes it: eight upper-case hex digits.
    pub fn json_key(self) -> JsonKey {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut key = [0_u8; 8];
        let value = (u32::from(self.0) << 16) | u32::from(self.1);
        for (i, digit) in key.iter_mut().enumerate() {
            *digit = HEX[((value >> (28 - 4 * i)) & 0xf) as usize];
        }
        JsonKey(key)
    }
}

/// A tag's DICOM JSON key, without allocating (tags are looked up for
/// every attribute of every row a partner returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonKey([u8; 8]);

impl JsonKey {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for JsonKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The attributes meshgate reads or queries, by keyword.
pub mod tags {
    use super::Tag;

    pub const SOP_CLASS_UID: Tag = Tag(0x0008, 0x0016);
    pub const SOP_INSTANCE_UID: Tag = Tag(0x0008, 0x0018);
    pub const STUDY_DATE: Tag = Tag(0x0008, 0x0020);
    pub const SERIES_DATE: Tag = Tag(0x0008, 0x0021);
    pub const STUDY_TIME: Tag = Tag(0x0008, 0x0030);
    pub const SERIES_TIME: Tag = Tag(0x0008, 0x0031);
    pub const ACCESSION_NUMBER: Tag = Tag(0x0008, 0x0050);
    pub const MODALITY: Tag = Tag(0x0008, 0x0060);
    pub const MODALITIES_IN_STUDY: Tag = Tag(0x0008, 0x0061);
    pub const MANUFACTURER: Tag = Tag(0x0008, 0x0070);
    pub const TIMEZONE_OFFSET_FROM_UTC: Tag = Tag(0x0008, 0x0201);
    pub const STUDY_DESCRIPTION: Tag = Tag(0x0008, 0x1030);
    pub const SERIES_DESCRIPTION: Tag = Tag(0x0008, 0x103E);
    pub const MANUFACTURER_MODEL_NAME: Tag = Tag(0x0008, 0x1090);
    pub const PATIENT_NAME: Tag = Tag(0x0010, 0x0010);
    pub const PATIENT_ID: Tag = Tag(0x0010, 0x0020);
    pub const PATIENT_BIRTH_DATE: Tag = Tag(0x0010, 0x0030);
    pub const PATIENT_SEX: Tag = Tag(0x0010, 0x0040);
    pub const PATIENT_AGE: Tag = Tag(0x0010, 0x1010);
    pub const BODY_PART_EXAMINED: Tag = Tag(0x0018, 0x0015);
    pub const STUDY_INSTANCE_UID: Tag = Tag(0x0020, 0x000D);
    pub const SERIES_INSTANCE_UID: Tag = Tag(0x0020, 0x000E);
    pub const STUDY_ID: Tag = Tag(0x0020, 0x0010);
    pub const SERIES_NUMBER: Tag = Tag(0x0020, 0x0011);
    pub const INSTANCE_NUMBER: Tag = Tag(0x0020, 0x0013);
    pub const LATERALITY: Tag = Tag(0x0020, 0x0060);
    pub const NUMBER_OF_STUDY_RELATED_SERIES: Tag = Tag(0x0020, 0x1206);
    pub const NUMBER_OF_STUDY_RELATED_INSTANCES: Tag = Tag(0x0020, 0x1208);
    pub const NUMBER_OF_SERIES_RELATED_INSTANCES: Tag = Tag(0x0020, 0x1209);
}

/// Read access to a set of DICOM attributes, whatever their encoding.
pub trait DicomAttributes {
    /// All values of an attribute as text, trimmed, empty values dropped.
    fn texts(&self, tag: Tag) -> Vec<String>;

    /// The first value of an attribute as text.
    fn text(&self, tag: Tag) -> Option<String> {
        self.texts(tag).into_iter().next()
    }

    /// The first value parsed as an unsigned integer (IS, US, UL…).
    fn unsigned(&self, tag: Tag) -> Option<u32> {
        self.text(tag).and_then(|v| v.parse().ok())
    }
}

/// A DICOM JSON object: `{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, …}`.
impl DicomAttributes for serde_json::Map<String, Value> {
    fn texts(&self, tag: Tag) -> Vec<String> {
        let Some(values) = self
            .get(tag.json_key().as_str())
            .and_then(|attribute| attribute.get("Value"))
            .and_then(Value::as_array)
        else {
            return Vec::new();
        };
        values
            .iter()
            .filter_map(|value| match value {
                Value::String(text) => Some(text.trim().to_owned()),
                Value::Number(number) => Some(number.to_string()),
                // Person names: {"Alphabetic": "Doe^John"}
                Value::Object(name) => name
                    .get("Alphabetic")
                    .and_then(Value::as_str)
                    .map(|text| text.trim().to_owned()),
                _ => None,
            })
            .filter(|text| !text.is_empty())
            .collect()
    }
}

/// The keyword of each attribute in [`tags`], as keyword-keyed JSON (AWS
/// HealthImaging image set metadata) names it.
const KEYWORDS: &[(Tag, &str)] = &[
    (tags::SOP_CLASS_UID, "SOPClassUID"),
    (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
    (tags::STUDY_DATE, "StudyDate"),
    (tags::SERIES_DATE, "SeriesDate"),
    (tags::STUDY_TIME, "StudyTime"),
    (tags::SERIES_TIME, "SeriesTime"),
    (tags::ACCESSION_NUMBER, "AccessionNumber"),
    (tags::MODALITY, "Modality"),
    (tags::MODALITIES_IN_STUDY, "ModalitiesInStudy"),
    (tags::MANUFACTURER, "Manufacturer"),
    (tags::TIMEZONE_OFFSET_FROM_UTC, "TimezoneOffsetFromUTC"),
    (tags::STUDY_DESCRIPTION, "StudyDescription"),
    (tags::SERIES_DESCRIPTION, "SeriesDescription"),
    (tags::MANUFACTURER_MODEL_NAME, "ManufacturerModelName"),
    (tags::PATIENT_NAME, "PatientName"),
    (tags::PATIENT_ID, "PatientID"),
    (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
    (tags::PATIENT_SEX, "PatientSex"),
    (tags::PATIENT_AGE, "PatientAge"),
    (tags::BODY_PART_EXAMINED, "BodyPartExamined"),
    (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
    (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID"),
    (tags::STUDY_ID, "StudyID"),
    (tags::SERIES_NUMBER, "SeriesNumber"),
    (tags::INSTANCE_NUMBER, "InstanceNumber"),
    (tags::LATERALITY, "Laterality"),
    (
        tags::NUMBER_OF_STUDY_RELATED_SERIES,
        "NumberOfStudyRelatedSeries",
    ),
    (
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        "NumberOfStudyRelatedInstances",
    ),
    (
        tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
        "NumberOfSeriesRelatedInstances",
    ),
];

/// The keyword of an attribute meshgate reads, e.g. `StudyInstanceUID`.
pub fn keyword(tag: Tag) -> Option<&'static str> {
    KEYWORDS
        .iter()
        .find(|(known, _)| *known == tag)
        .map(|(_, keyword)| *keyword)
}

/// A keyword-keyed JSON object, as AWS HealthImaging writes image set
/// metadata: `{"StudyInstanceUID": "1.2.3", "SeriesNumber": 2, …}`. Values
/// are strings, numbers, or arrays of them (multi-valued attributes).
#[derive(Debug, Clone, Copy)]
pub struct KeywordJson<'a>(pub &'a serde_json::Map<String, Value>);

impl DicomAttributes for KeywordJson<'_> {
    fn texts(&self, tag: Tag) -> Vec<String> {
        let Some(value) = keyword(tag).and_then(|keyword| self.0.get(keyword)) else {
            return Vec::new();
        };
        let values = match value {
            Value::Array(values) => values.iter().collect(),
            value => vec![value],
        };
        values
            .into_iter()
            .filter_map(|value| match value {
                Value::String(text) => Some(text.trim().to_owned()),
                Value::Number(number) => Some(number.to_string()),
                _ => None,
            })
            .filter(|text| !text.is_empty())
            .collect()
    }
}

/// Parses a DICOM DA value (`YYYYMMDD`; the old `YYYY.MM.DD` form too).
pub fn parse_date(value: &str) -> Option<Date> {
    let digits: String = value.chars().filter(char::is_ascii_digit).collect();
    if digits.len() != 8 {
        return None;
    }
    let year = digits.get(0..4)?.parse().ok()?;
    let month: u8 = digits.get(4..6)?.parse().ok()?;
    let day = digits.get(6..8)?.parse().ok()?;
    Date::from_calendar_date(year, Month::try_from(month).ok()?, day).ok()
}

/// Formats a date as DICOM DA (`YYYYMMDD`).
pub fn format_date(date: Date) -> String {
    format!(
        "{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// Parses a DICOM TM value (`HH`, `HHMM`, `HHMMSS`, `HHMMSS.FFFFFF`, or the
/// old `HH:MM:SS` form); fractions are dropped.
pub fn parse_time(value: &str) -> Option<Time> {
    let whole = value.split('.').next().unwrap_or_default();
    let digits: String = whole.chars().filter(char::is_ascii_digit).collect();
    let field = |range: std::ops::Range<usize>| -> Option<u8> {
        match digits.get(range) {
            Some(text) if !text.is_empty() => text.parse().ok(),
            _ => Some(0),
        }
    };
    if digits.len() < 2 || digits.len() > 6 || !digits.len().is_multiple_of(2) {
        return None;
    }
    Time::from_hms(field(0..2)?, field(2..4)?, field(4..6)?).ok()
}

/// Parses a DICOM Timezone Offset From UTC (`+HHMM` / `-HHMM`).
pub fn parse_utc_offset(value: &str) -> Option<UtcOffset> {
    let (sign, rest) = match value.as_bytes().first()? {
        b'+' => (1i8, value.get(1..)?),
        b'-' => (-1i8, value.get(1..)?),
        _ => return None,
    };
    if rest.len() != 4 || !rest.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hours: i8 = rest.get(0..2)?.parse().ok()?;
    let minutes: i8 = rest.get(2..4)?.parse().ok()?;
    UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()
}

/// Parses a DICOM AS value (`057Y`, `011M`, `003W`, `004D`) into whole years.
pub fn parse_age_years(value: &str) -> Option<u16> {
    let (number, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    let number: u16 = number.parse().ok()?;
    match unit {
        "Y" => Some(number),
        "M" => Some(number / 12),
        "W" => Some(number / 52),
        "D" => Some(number / 365),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_keyed_as_dicom_json_writes_them() {
        assert_eq!(tags::STUDY_INSTANCE_UID.json_key().as_str(), "0020000D");
        assert_eq!(Tag(0xABCD, 0x0001).json_key().to_string(), "ABCD0001");
    }
    use time::macros::{date, time};

    #[test]
    fn dicom_dates_times_offsets_and_ages_parse() {
        assert_eq!(parse_date("20190304"), Some(date!(2019 - 03 - 04)));
        assert_eq!(parse_date("2019.03.04"), Some(date!(2019 - 03 - 04)));
        assert_eq!(parse_date("20190230"), None);
        assert_eq!(parse_date("2019"), None);
        assert_eq!(parse_time("101502.123"), Some(time!(10:15:02)));
        assert_eq!(parse_time("1015"), Some(time!(10:15)));
        assert_eq!(parse_time("10:15:02"), Some(time!(10:15:02)));
        assert_eq!(parse_time("25"), None);
        assert_eq!(
            parse_utc_offset("+0130").map(|o| o.whole_minutes()),
            Some(90)
        );
        assert_eq!(parse_utc_offset("-0500").map(|o| o.whole_hours()), Some(-5));
        assert_eq!(parse_utc_offset("0500"), None);
        assert_eq!(parse_age_years("057Y"), Some(57));
        assert_eq!(parse_age_years("018M"), Some(1));
        assert_eq!(parse_age_years("Y"), None);
        assert_eq!(format_date(date!(2005 - 01 - 09)), "20050109");
    }

    #[test]
    fn dicom_json_values_of_every_shape_read_as_text() {
        let json: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{
              "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
              "00201206": {"vr": "IS", "Value": [3]},
              "00080061": {"vr": "CS", "Value": ["CT", "SR "]},
              "00081030": {"vr": "LO"}
            }"#,
        )
        .unwrap();
        assert_eq!(json.text(tags::PATIENT_NAME).as_deref(), Some("Doe^Jane"));
        assert_eq!(json.unsigned(tags::NUMBER_OF_STUDY_RELATED_SERIES), Some(3));
        assert_eq!(json.texts(tags::MODALITIES_IN_STUDY), ["CT", "SR"]);
        assert_eq!(json.text(tags::STUDY_DESCRIPTION), None);
    }
}
