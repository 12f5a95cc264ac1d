"""What the exporter and the service both read; defined once here. Imports nothing else of this project."""
