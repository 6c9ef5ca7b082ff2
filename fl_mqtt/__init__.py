"""MQTT transport used by both the edge client and the aggregator (paho-mqtt v2)."""
