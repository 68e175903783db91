"""Command line, certificate tooling, load generator, proto generation."""
