"""Publishing: the in-process hub with bounded per-subscriber queues (MQTT later).

Public API::

    from service.bus import Hub, HubClosed, Subscription, create_bus

    hub = create_bus("memory://")                 # or Hub(frame_queue=64)
    sub = hub.subscribe(types={"frame"}, cameras={"cam-1"}, maxsize=64)
    hub.publish({"v": 1, "type": "frame", "camera": "cam-1", ...})   # any thread
    message = await sub.get()     # or sub.get_nowait() / sub.get_blocking(timeout)
    sub.close(); hub.close()
"""

from service.bus.factory import Bus, BusSubscription, create_bus
from service.bus.hub import Hub, HubClosed, Message, Subscription

__all__ = ["Bus", "BusSubscription", "Hub", "HubClosed", "Message", "Subscription", "create_bus"]
