"""Infrastructure: settings, the inventory database, clients for Temporal, AWS and Slack,
logging, metrics and health. Below the services, above the pure rules; never imports them back."""
