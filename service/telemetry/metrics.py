"""Every Prometheus metric LineWatch exports, defined once.

Stages import the metric they update from here; nothing else creates metrics.
Names follow Prometheus conventions (``_total`` counters, base units: seconds).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

NAMESPACE = "linewatch"

# --- cameras / sources ------------------------------------------------------
FRAMES_CAPTURED = Counter(
    "frames_captured", "Frames read from a camera source.", ["camera"], namespace=NAMESPACE
)
FRAMES_PROCESSED = Counter(
    "frames_processed", "Frames that went through inference and were published.", ["camera"],
    namespace=NAMESPACE,
)
FRAMES_DROPPED = Counter(
    "frames_dropped",
    "Frames dropped before processing, by reason (stale: replaced by a newer frame "
    "before inference took it).",
    ["camera", "reason"],
    namespace=NAMESPACE,
)
CAMERA_UP = Gauge("camera_up", "1 when the camera delivers frames, else 0.", ["camera"],
                  namespace=NAMESPACE)
CAMERA_STATE = Gauge(
    "camera_state", "1 for the camera's current state (connecting, up, down, stopped).",
    ["camera", "state"], namespace=NAMESPACE,
)
CAMERA_RECONNECTS = Counter(
    "camera_reconnects", "Reconnect attempts after a source failure.", ["camera"],
    namespace=NAMESPACE,
)
CAMERA_FPS = Gauge("camera_fps", "Measured capture rate (frames/s).", ["camera"],
                   namespace=NAMESPACE)
CAMERA_EXPECTED_FPS = Gauge(
    "camera_expected_fps", "Configured or nominal frame rate of the camera.", ["camera"],
    namespace=NAMESPACE,
)
CAMERA_LAST_FRAME = Gauge(
    "camera_last_frame_timestamp_seconds", "Wall-clock time of the newest captured frame.",
    ["camera"], namespace=NAMESPACE,
)

# --- inference ---------------------------------------------------------------
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
CAPTURE_TO_PUBLISH = Histogram(
    "capture_to_publish_seconds", "Time from frame capture to publishing its message.",
    ["camera"], buckets=LATENCY_BUCKETS, namespace=NAMESPACE,
)
INFERENCE_SECONDS = Histogram(
    "inference_seconds", "Model run time per batch (session.run only).", ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0),
    namespace=NAMESPACE,
)
BATCH_SIZE = Histogram(
    "inference_batch_size", "Frames per inference batch.", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64), namespace=NAMESPACE,
)
PROVIDER = Gauge(
    "inference_provider", "1 for the execution provider a model actually runs on.",
    ["model", "provider"], namespace=NAMESPACE,
)
MODEL_LOADED = Gauge("model_loaded", "1 when the model is loaded and warmed up.", ["model"],
                     namespace=NAMESPACE)
INSTANCES = Histogram(
    "instances_per_frame", "Detected instances per processed frame.", ["camera"],
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34), namespace=NAMESPACE,
)

# --- publishing --------------------------------------------------------------
WS_CLIENTS = Gauge("websocket_clients", "Connected websocket clients.", ["stream"],
                   namespace=NAMESPACE)
WS_DROPPED = Counter(
    "websocket_dropped_messages",
    "Frame messages a slow websocket client lost (its own oldest first).", ["stream"],
    namespace=NAMESPACE,
)
MESSAGES_PUBLISHED = Counter(
    "messages_published", "Messages published on the bus, by type.", ["type"],
    namespace=NAMESPACE,
)

BUILD_INFO = Info("build", "LineWatch version.", namespace=NAMESPACE)

# --- rules, line states, events (service/rules; appended by the rules engineer) ---
LINE_STATE = Gauge(
    "line_state", "1 for the line's current state (RUNNING, IDLE, STOPPED, JAMMED, FAULT, "
    "UNKNOWN), 0 for the others.", ["line", "state"], namespace=NAMESPACE,
)
RULE_VIOLATED = Gauge(
    "rule_violated", "1 while the rule is violated, else 0.", ["line", "rule", "type"],
    namespace=NAMESPACE,
)
RULE_UNKNOWN = Gauge(
    "rule_unknown", "1 while the rule's status is unknown (stale camera, no evidence yet).",
    ["line", "rule", "type"], namespace=NAMESPACE,
)
PARTS_COUNTED = Counter(
    "parts_counted", "Tracks counted crossing a throughput rule's count line.",
    ["line", "rule"], namespace=NAMESPACE,
)
BELT_SPEED = Gauge(
    "belt_speed_meters_per_second",
    "Belt speed estimated by a conveyor rule from its tracked parts (NaN: no parts).",
    ["line", "rule"], namespace=NAMESPACE,
)
CYCLE_TIME = Histogram(
    "cycle_time_seconds", "Time between successive counted parts of a line.", ["line"],
    buckets=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0),
    namespace=NAMESPACE,
)
POSE_RESIDUAL = Histogram(
    "pose_fit_residual_meters", "RMS residual of the rigid fit of a part's keypoints to its "
    "template.", ["camera"],
    buckets=(0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05),
    namespace=NAMESPACE,
)

# --- MQTT (service/bus/mqtt.py, service/remote.py) ---------------------------------
MQTT_CONNECTED = Gauge(
    "mqtt_connected", "1 while connected to the MQTT broker.", ["role"], namespace=NAMESPACE
)
MQTT_DROPPED = Counter(
    "mqtt_dropped_messages",
    "Messages not sent to the broker, by type and reason (queue_full: the outgoing queue was "
    "full; disconnected; unroutable; unencodable).", ["type", "reason"], namespace=NAMESPACE,
)
MQTT_SENT = Counter(
    "mqtt_sent_messages", "Messages handed to the MQTT client, by type.", ["type"],
    namespace=NAMESPACE,
)
MQTT_RECEIVED = Counter(
    "mqtt_received_messages", "Messages received from the broker, by type.", ["type"],
    namespace=NAMESPACE,
)
MQTT_DUPLICATE_EVENTS = Counter(
    "mqtt_duplicate_events", "Events received again from the broker (QoS 1 redelivery) and "
    "dropped: each event reaches the API's clients once.", namespace=NAMESPACE,
)
MQTT_INVALID = Counter(
    "mqtt_invalid_messages", "Messages received from the broker that were refused.", ["reason"],
    namespace=NAMESPACE,
)
