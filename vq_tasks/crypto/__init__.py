"""Encryption and signatures: the age format (age, age_keys), the encryption stage and its keys
(encryption), signed manifests (signing)."""
