"""The engine: capture, the canonical vocabulary, patterns, the Rewriter, the pass driver, the
pipeline, reports and verification. It imports nothing from the rest of the package: passes and
codegen are written against it, and the front doors (`fxrewrite.api`, `.backend`, `.onnx_export`,
`.cli`) wire them together."""
