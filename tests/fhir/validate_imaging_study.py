#!/usr/bin/env python3
"""Validates FHIR ImagingStudy resources with an independent implementation.

Reads a JSON array of resources on stdin and validates each against the
R4B ImagingStudy model of the `fhir.resources` package (R4B ImagingStudy JSON
is R4 ImagingStudy JSON). Prints the number validated; exits 1 naming the
first invalid resource's index and the validator's reasons.
"""
import json
import sys

from fhir.resources.R4B.imagingstudy import ImagingStudy

# fhir.resources checks structure, types, cardinality and primitive formats but
# not required value-set bindings; ImagingStudy.status has one (R4 and R4B).
STATUS_CODES = {"registered", "available", "cancelled", "entered-in-error", "unknown"}


def main() -> int:
    resources = json.load(sys.stdin)
    if not isinstance(resources, list):
        print("expected a JSON array of resources", file=sys.stderr)
        return 2
    for index, resource in enumerate(resources):
        if resource.get("resourceType") != "ImagingStudy":
            print(f"resource {index} is not an ImagingStudy", file=sys.stderr)
            return 1
        if resource.get("status") not in STATUS_CODES:
            print(f"resource {index} has a status outside the required value set", file=sys.stderr)
            return 1
        try:
            ImagingStudy.model_validate(resource)
        except Exception as error:  # the validator's own error type varies by version
            print(f"resource {index} is not a valid R4 ImagingStudy: {error}", file=sys.stderr)
            return 1
    print(f"validated {len(resources)} ImagingStudy resources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
