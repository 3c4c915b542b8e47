"""An independent Confluent client (confluent-kafka-python, librdkafka + fastavro) for keel's
interop test. It knows only the broker and the registry URL, never keel's code.

  produce BROKERS REGISTRY TOPIC SCHEMA_FILE COUNT   writes COUNT OrderCreated records, prints them
  consume BROKERS REGISTRY TOPIC COUNT               reads COUNT records, prints each decoded value

Output: one JSON object per line on stdout.
"""

import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def produce(brokers, registry, topic, schema_file, count):
    client = SchemaRegistryClient({"url": registry})
    with open(schema_file) as f:
        schema = f.read()
    serializer = AvroSerializer(
        client, schema, conf={"subject.name.strategy": topic_record_subject_name_strategy}
    )
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    for i in range(count):
        order_id = str(uuid.uuid4())
        value = {
            "event_id": str(uuid.uuid4()),
            "occurred_at": int(time.time() * 1000),
            "order_id": order_id,
            "order_version": 1,
            "customer": {"id": f"py-{i}", "email": f"py{i}@example.com", "name": "Python Client"},
            "currency": "EUR",
            "lines": [{"sku": "SKU-9", "quantity": i + 1, "unit_price_minor": 250}],
            "total_minor": (i + 1) * 250,
            "channel": "python",
        }
        data = serializer(value, SerializationContext(topic, MessageField.VALUE))
        producer.produce(topic, key=order_id.encode(), value=data)
        print(json.dumps({"order_id": order_id, "schema_id": int.from_bytes(data[1:5], "big")}), flush=True)
    remaining = producer.flush(30)
    if remaining:
        sys.exit(f"{remaining} records not delivered")


def consume(brokers, registry, topic, count):
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"py-interop-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    deadline = time.time() + 90
    seen = 0
    try:
        while seen < count:
            if time.time() > deadline:
                sys.exit(f"read {seen} of {count} records within 90 s")
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                print(f"consumer error: {msg.error()}", file=sys.stderr)
                continue
            value = deserializer(msg.value(), SerializationContext(msg.topic(), MessageField.VALUE))
            value["_schema_id"] = int.from_bytes(msg.value()[1:5], "big")
            print(json.dumps(value, default=str), flush=True)
            seen += 1
    finally:
        consumer.close()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "produce":
        produce(args[0], args[1], args[2], args[3], int(args[4]))
    elif command == "consume":
        consume(args[0], args[1], args[2], int(args[3]))
    else:
        sys.exit(f"unknown command {command}")
