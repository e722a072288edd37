"""Generated wire types of meg.v1 (do not edit; see scripts/gen_proto.py)."""
