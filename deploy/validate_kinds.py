#!/usr/bin/env python3
"""Validates the custom-resource objects of rendered manifests (argv[1]) against the schemas in
deploy/schemas/ (unknown fields are errors there, as in the core kinds), and writes the core
kinds to argv[2] for kubernetes-validate."""

import json
import os
import sys

import jsonschema
import yaml

CRD_GROUPS = ("monitoring.coreos.com", "keda.sh", "gateway.networking.k8s.io")
SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core, errors = [], []
for d in docs:
    group, _, version = d["apiVersion"].rpartition("/")
    if group not in CRD_GROUPS:
        core.append(d)
        continue
    path = os.path.join(SCHEMAS, f"{group}_{d['kind'].lower()}_{version}.json")
    if not os.path.exists(path):
        errors.append(f"{d['kind']} {d['metadata']['name']}: no schema at {path}")
        continue
    schema = json.load(open(path))
    # The catalog's patterns are Go regular expressions; the schemas are trusted as they are.
    validator = jsonschema.validators.validator_for(schema)(schema)
    for e in validator.iter_errors(d):
        errors.append(f"{d['kind']} {d['metadata']['name']}: {'/'.join(map(str, e.path))}: {e.message}")
    print(f"{d['kind']} {d['metadata']['name']}: checked against {os.path.basename(path)}")
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
