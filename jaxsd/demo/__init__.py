"""`jaxsd demo`: train a tiny text-to-image model from scratch on the CPU and show it follows prompts."""
