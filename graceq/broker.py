"""The embedded broker: kombu's folder transport, with messages that appear whole.

kombu's ``filesystem`` transport creates a message file and then writes into it, and its consumer
neither waits for the writer's lock nor skips a file it cannot parse: a worker polling the folder
at that moment reads an empty file, and the JSON error kills its consumer (seen here with 2
worker processes and a busy coordinator). Here a message is written under a hidden name and
renamed into the queue folder, so a consumer sees a complete file or none; and a consumed message
is moved within the broker folder (an atomic rename on one file system) instead of to /tmp, so
that two worker processes can never both take it.

Registered as the ``graceqfs://`` transport when ``graceq.app`` is imported.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from queue import Empty


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        hidden = os.path.join(self.data_folder_out, f".{name}.part")  # not matched by _get
        with open(hidden, "wb") as handle:
            handle.write(str_to_bytes(dumps(payload)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(hidden, final)

    def _get(self, queue):
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.startswith(".") or name.partition(".")[2] != wanted:
                continue
            taken = os.path.join(self.processed_folder, f"{os.getpid()}-{name}")
            try:
                os.rename(os.path.join(self.data_folder_in, name), taken)
            except OSError:  # another worker process took it first
                continue
            with open(taken, "rb") as handle:
                payload = handle.read()
            if not self.store_processed:
                os.remove(taken)
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault("graceqfs", "graceq.broker:Transport")
