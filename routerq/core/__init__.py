"""The core both sides share: settings, errors, schemas and stores, the broker protocol, telemetry."""
