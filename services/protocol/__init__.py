"""Generated protocol modules (from protos/); do not edit."""
