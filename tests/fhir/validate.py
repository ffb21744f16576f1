#!/usr/bin/env python3
"""Validates FHIR resources with an independent implementation.

Usage: validate.py RESOURCE_TYPE < resources.json

Reads a JSON array of resources on stdin and validates each against the R4B
model of RESOURCE_TYPE (ImagingStudy or AuditEvent) in the `fhir.resources`
package (R4B JSON of both is R4 JSON). Prints the number validated; exits 1
naming the first invalid resource's index and the validator's reasons.
"""
import json
import sys

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.imagingstudy import ImagingStudy

MODELS = {"ImagingStudy": ImagingStudy, "AuditEvent": AuditEvent}

# fhir.resources checks structure, types, cardinality and primitive formats but
# not required value-set bindings; these are the required ones of the fields
# meshgate writes (R4 and R4B).
REQUIRED_CODES = {
    "ImagingStudy": {
        "status": {"registered", "available", "cancelled", "entered-in-error", "unknown"},
    },
    "AuditEvent": {
        "action": {"C", "R", "U", "D", "E"},
        "outcome": {"0", "4", "8", "12"},
    },
}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in MODELS:
        print(f"usage: validate.py {'|'.join(MODELS)} < resources.json", file=sys.stderr)
        return 2
    kind = sys.argv[1]
    resources = json.load(sys.stdin)
    if not isinstance(resources, list):
        print("expected a JSON array of resources", file=sys.stderr)
        return 2
    for index, resource in enumerate(resources):
        if resource.get("resourceType") != kind:
            print(f"resource {index} is not a {kind}", file=sys.stderr)
            return 1
        for field, codes in REQUIRED_CODES[kind].items():
            if field in resource and resource[field] not in codes:
                print(f"resource {index} has a {field} outside the required value set", file=sys.stderr)
                return 1
        try:
            MODELS[kind].model_validate(resource)
        except Exception as error:  # the validator's own error type varies by version
            print(f"resource {index} is not a valid R4 {kind}: {error}", file=sys.stderr)
            return 1
    print(f"validated {len(resources)} {kind} resources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
