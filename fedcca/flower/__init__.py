"""The Flower layer: the CCAMerge strategy, one round's aggregation, the reply protocol, reply
screens, round records, replies streamed as they arrive and the in-process grid. The only part of the library that imports flwr."""
