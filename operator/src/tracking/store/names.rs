//! Run names for runs created without one: `adjective-animal-N`, the shape
//! MLflow gives them.
const ADJECTIVES: &[&str] = &[
    "able",
    "agile",
    "amazing",
    "ambitious",
    "amusing",
    "bold",
    "brave",
    "bright",
    "calm",
    "capable",
    "careful",
    "charming",
    "clean",
    "clever",
    "colorful",
    "crisp",
    "curious",
    "dapper",
    "daring",
    "dazzling",
    "eager",
    "easy",
    "elegant",
    "fearless",
    "festive",
    "fun",
    "gentle",
    "glamorous",
    "gifted",
    "handsome",
    "honest",
    "humble",
    "industrious",
    "intelligent",
    "jolly",
    "judicious",
    "kindly",
    "likeable",
    "lively",
    "loud",
    "luxuriant",
    "magnificent",
    "merciful",
    "mysterious",
    "nebulous",
    "nimble",
    "orderly",
    "overjoyed",
    "peaceful",
    "polite",
    "puzzled",
    "resilient",
    "rogue",
    "rumbling",
    "salty",
    "secretive",
    "serious",
    "shivering",
    "silent",
    "skillful",
    "smiling",
    "spiffy",
    "stately",
    "sincere",
    "tasteful",
    "thoughtful",
    "trusting",
    "unequaled",
    "upbeat",
    "valuable",
    "vaunted",
    "victorious",
    "wise",
    "witty",
    "youthful",
    "zealous",
];

const ANIMALS: &[&str] = &[
    "ant", "ape", "auk", "bass", "bat", "bear", "bee", "bird", "boar", "bug", "calf", "carp", "cat", "chimp", "cod",
    "colt", "conch", "cow", "crab", "crane", "croc", "crow", "cub", "deer", "doe", "dog", "dolphin", "donkey", "dove",
    "duck", "eel", "elk", "fawn", "finch", "fish", "flea", "fly", "foal", "fowl", "fox", "frog", "gnat", "gnu", "goat",
    "goose", "grouse", "grub", "gull", "hare", "hawk", "hen", "hog", "horse", "hound", "jay", "kit", "kite", "koi",
    "lamb", "lark", "loon", "lynx", "mare", "midge", "mink", "mole", "moose", "moth", "mouse", "mule", "newt", "owl",
    "ox", "panda", "penguin", "perch", "pig", "pug", "quail", "ram", "rat", "ray", "robin", "roo", "rook", "seal",
    "shad", "shark", "sheep", "shoat", "shrew", "shrike", "shrimp", "skink", "skunk", "sloth", "slug", "snail",
    "snake", "snipe", "sow", "squid", "stag", "stoat", "swan", "tern", "toad", "trout", "turtle", "vole", "wasp",
    "whale", "wolf", "worm", "wren", "yak", "zebra",
];

/// A random `adjective-animal-N` name of at most 20 characters.
pub fn random_run_name() -> String {
    loop {
        let r = uuid::Uuid::new_v4().as_u128();
        let adjective = ADJECTIVES[(r % ADJECTIVES.len() as u128) as usize];
        let animal = ANIMALS[((r >> 32) % ANIMALS.len() as u128) as usize];
        let n = (r >> 64) % 1001;
        let name = format!("{adjective}-{animal}-{n}");
        if name.len() <= 20 {
            return name;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_have_mlflows_shape() {
        for _ in 0..100 {
            let name = super::random_run_name();
            let parts: Vec<&str> = name.split('-').collect();
            assert_eq!(parts.len(), 3, "{name}");
            assert!(name.len() <= 20);
            assert!(parts[2].parse::<u32>().unwrap() <= 1000);
        }
    }
}
