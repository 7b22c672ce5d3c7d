"""The loop's Kafka security settings as each client library takes them.

:class:`~perfusion.settings.KafkaSecuritySettings` (the ``kafka_security`` section of every process's Kafka
settings, read from ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_MECHANISM``, ``KAFKA_SASL_USERNAME``,
``KAFKA_SASL_PASSWORD``, ``KAFKA_SSL_CAFILE``, ``KAFKA_SSL_CERTFILE``, ``KAFKA_SSL_KEYFILE`` and
``KAFKA_SSL_CHECK_HOSTNAME``) is validated once; these functions only translate it:

- :func:`kafka_python_kwargs` for kafka-python's ``KafkaProducer``, ``KafkaConsumer`` and ``KafkaAdminClient``
  (``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``, ``ssl_cafile``,
  ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``);
- :func:`aiokafka_kwargs` for aiokafka's clients, which take TLS as an ``ssl_context``;
- :func:`faust_credentials` for ``faust.App(broker_credentials=...)``: ``SASLCredentials`` (with the TLS context
  under SASL_SSL) or ``SSLCredentials``;
- :func:`security_environment`: the variables that give a child process the same settings.

PLAINTEXT gives no arguments at all, so a client built for the local broker is built as before. The password
leaves its ``SecretStr`` only here, into the client's arguments.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from perfusion.settings import KafkaSecuritySettings

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT


def _sasl_credentials(security: KafkaSecuritySettings) -> dict[str, Any]:
    password = security.sasl_password.get_secret_value() if security.sasl_password is not None else None
    return {
        "sasl_mechanism": security.sasl_mechanism,
        "sasl_plain_username": security.sasl_username,
        "sasl_plain_password": password,
    }


def _protocol_and_sasl(security: KafkaSecuritySettings) -> dict[str, Any]:
    """What kafka-python's and aiokafka's clients take alike: the protocol and the SASL credentials."""
    kwargs: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_sasl:
        kwargs.update(_sasl_credentials(security))
    return kwargs


def kafka_python_kwargs(security: KafkaSecuritySettings | None) -> dict[str, Any]:
    """Keyword arguments of kafka-python's clients; empty for PLAINTEXT (or no settings)."""
    if security is None or security.protocol == "PLAINTEXT":
        return {}
    kwargs = _protocol_and_sasl(security)
    if security.uses_ssl:
        kwargs["ssl_check_hostname"] = security.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(security, name)
            if path is not None:
                kwargs[name] = str(path)
    return kwargs


def ssl_context(security: KafkaSecuritySettings | None) -> ssl.SSLContext | None:
    """The TLS context of SSL and SASL_SSL: the CA file (else the system's CAs), the client certificate and key
    when given, hostname checking as set; None for the protocols without TLS."""
    if security is None or not security.uses_ssl:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(security.ssl_cafile) if security.ssl_cafile is not None else None
    )
    if security.ssl_certfile is not None:
        keyfile = str(security.ssl_keyfile) if security.ssl_keyfile is not None else None
        context.load_cert_chain(str(security.ssl_certfile), keyfile)
    context.check_hostname = security.ssl_check_hostname
    return context


def aiokafka_kwargs(security: KafkaSecuritySettings | None) -> dict[str, Any]:
    """Keyword arguments of aiokafka's clients (TLS as ``ssl_context``); empty for PLAINTEXT (or no settings)."""
    if security is None or security.protocol == "PLAINTEXT":
        return {}
    kwargs = _protocol_and_sasl(security)
    if security.uses_ssl:
        kwargs["ssl_context"] = ssl_context(security)
    return kwargs


def faust_credentials(security: KafkaSecuritySettings | None) -> CredentialsT | None:
    """``broker_credentials`` of a Faust app: SASL credentials (with the TLS context under SASL_SSL), SSL
    credentials, or None for PLAINTEXT. Faust passes them to aiokafka as :func:`aiokafka_kwargs` would."""
    if security is None or security.protocol == "PLAINTEXT":
        return None
    from faust.auth import SASLCredentials, SSLCredentials

    context = ssl_context(security)
    if security.uses_sasl:
        credentials = _sasl_credentials(security)
        return SASLCredentials(
            username=credentials["sasl_plain_username"],
            password=credentials["sasl_plain_password"],
            ssl_context=context,
            mechanism=credentials["sasl_mechanism"],
        )
    return SSLCredentials(context)


def security_environment(security: KafkaSecuritySettings) -> dict[str, str]:
    """The ``KAFKA_*`` variables that give a child process (``perfusion worker`` ...) these settings, the password
    among them: for the child's environment, never for a log."""
    environment: dict[str, str] = {}
    for name, info in KafkaSecuritySettings.model_fields.items():
        value = getattr(security, name)
        if value is None or value == "":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        environment[str(info.validation_alias)] = str(value).lower() if isinstance(value, bool) else str(value)
    return environment
