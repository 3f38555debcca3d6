"""FeatureCloud drivers: the website REST API (`api`), the participant's local controller API (`controller_client`)."""
