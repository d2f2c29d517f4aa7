"""Coverage-guided fuzzing of relayd's parsers with atheris: see docs/fuzzing.md."""
