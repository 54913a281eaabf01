"""The portal connector (CONTRACT §8): an Innokylä-style portal's entries as projects on the bus."""
