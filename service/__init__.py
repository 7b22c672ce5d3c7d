"""The generator service: FastAPI app, personalized generator, hot reload, and its Kafka and Feast seams."""
