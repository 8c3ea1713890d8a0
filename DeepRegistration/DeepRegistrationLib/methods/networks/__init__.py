"""The registration networks. Each module defines a config dataclass and a `RegistrationNetwork` subclass."""
