//! Audit entries as FHIR R4 AuditEvent, following the IHE Basic Audit Log
//! Patterns (BALP) Query pattern: a RESTful `search` executed by a user
//! (the information recipient) through a client against meshgate, with
//! the query itself as a base64 entity and, per partner, what was
//! disclosed.

use base64::Engine as _;
use serde_json::{Value, json};

use super::StoredEntry;

const BALP_QUERY: &str =
    "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Query";

/// One entry as an AuditEvent resource.
pub fn audit_event(entry: &StoredEntry) -> Value {
    let record: Value = serde_json::from_str(&entry.record).unwrap_or(Value::Null);
    let codes: Vec<&str> = record["error_codes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let outcome = if entry.outcome == "success" {
        "0"
    } else if codes
        .iter()
        .any(|c| c.contains("UNAVAILABLE") || c.contains("INTERNAL"))
    {
        "8"
    } else {
        "4"
    };
    let accesses: Vec<&Value> = record["accesses"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();

    let mut agents = Vec::new();
    if let Some(principal) = record["principal"].as_object() {
        let mut user = json!({
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "code": "IRCP",
                "display": "information recipient"
            }]},
            "who": {"identifier": {
                "system": principal.get("issuer").and_then(Value::as_str).unwrap_or_default(),
                "value": principal.get("subject").and_then(Value::as_str).unwrap_or_default(),
            }},
            "requestor": true,
        });
        let roles: Vec<Value> = principal
            .get("roles")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|role| json!({"text": role}))
            .collect();
        if !roles.is_empty() {
            user["role"] = Value::Array(roles);
        }
        if let Some(institution) = principal.get("institution").and_then(Value::as_str) {
            user["who"]["display"] = json!(institution);
        }
        if !accesses.is_empty() {
            user["purposeOfUse"] = json!([{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "code": "HRESCH",
                "display": "healthcare research"
            }]}]);
        }
        agents.push(user);
    }
    let mut client = json!({
        "type": {"coding": [{
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110153",
            "display": "Source Role ID"
        }]},
        "who": {"display": "client"},
        "requestor": false,
    });
    if let Some(address) = record["client"].as_str() {
        client["network"] = json!({"address": address, "type": "2"});
    }
    agents.push(client);
    let mut gateway = json!({
        "type": {"coding": [{
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110152",
            "display": "Destination Role ID"
        }]},
        "who": {"display": "meshgate"},
        "requestor": false,
    });
    // The configuration and policies that decided the request.
    if let Some(snapshot) = record["snapshot"].as_str() {
        gateway["policy"] = json!([format!("urn:meshgate:snapshot:sha256:{snapshot}")]);
    }
    agents.push(gateway);

    let mut entities: Vec<Value> = accesses
        .iter()
        .map(|access| {
            let query = super::canonical_json(&access["filter"]);
            let mut details = vec![json!({
                "type": "project",
                "valueString": access["project"].as_str().unwrap_or_default(),
            })];
            for partner in access["partners"].as_array().into_iter().flatten() {
                let mut said = vec![
                    partner["status"].as_str().unwrap_or_default().to_owned(),
                    partner["disclosure"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ];
                if let Some(profile) = partner["deidentification_profile"].as_str() {
                    said.push(format!("profile {profile}"));
                }
                if let Some(count) = partner["count"].as_u64() {
                    said.push(format!(
                        "count {count} {}",
                        partner["count_disclosure"].as_str().unwrap_or_default()
                    ));
                }
                details.push(json!({
                    "type": format!("partner {}", partner["partner"].as_str().unwrap_or_default()),
                    "valueString": said.join(" ").trim().to_owned(),
                }));
            }
            json!({
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object"
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "24",
                    "display": "Query"
                },
                "description": access["field"].as_str().unwrap_or_default(),
                "query": base64::engine::general_purpose::STANDARD.encode(query),
                "detail": details,
            })
        })
        .collect();
    entities.push(json!({
        "what": {"identifier": {"system": "urn:meshgate:request-id", "value": record["request_id"].as_str().unwrap_or_default()}},
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "2",
            "display": "System Object"
        },
        "detail": [{"type": "chain", "valueString": format!("seq {} sha256 {}", entry.seq, entry.hash)}],
    }));

    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": entry.seq.to_string(),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation"
        },
        "subtype": [{
            "system": "http://hl7.org/fhir/restful-interaction",
            "code": "search",
            "display": "search"
        }],
        "action": "E",
        "recorded": entry.recorded,
        "outcome": outcome,
        "agent": agents,
        "source": {
            "observer": {"display": "meshgate"},
            "type": [{
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server"
            }]
        },
        "entity": entities,
    });
    if !accesses.is_empty() {
        event["meta"] = json!({"profile": [BALP_QUERY]});
    }
    if !codes.is_empty() {
        event["outcomeDesc"] = json!(codes.join(" "));
    }
    if let Some(operation) = record["operation"].as_str() {
        event["subtype"].as_array_mut().into_iter().for_each(|s| {
            s.push(json!({"system": "urn:meshgate:graphql-operation", "code": operation}))
        });
    }
    event
}
