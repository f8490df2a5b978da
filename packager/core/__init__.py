"""The build side's core: architecture facts (`arch`), checkpoint I/O and its formats, plan and
statistics files, fingerprints, provenance and streamed execution. It imports only itself and
`runtime`; every stage (calibrate, plan, prune, distill, verify, bundle, report, converters) builds
on it, and nothing here imports a stage (tests/test_layering.py)."""
