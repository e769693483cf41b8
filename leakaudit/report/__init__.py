"""Reports: JSON, figures, HTML."""
