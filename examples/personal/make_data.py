#!/usr/bin/env python3
"""Generate the ``examples/personal`` demo dataset (deterministic; standard library only).

The data: short notes from the journal of Maya Lindqvist, a fictional landscape
architect in Portland, Oregon (see README.md). The task: label each note with one
of six categories. Notes are written from templates plus vocabulary; the
categories are balanced in every split; and no note is used twice anywhere -- not
even with only its dates or times changed -- so valid and test notes are new
sentences, not copies of training notes.

    python examples/personal/make_data.py            # rewrite the shipped files
    python examples/personal/make_data.py --out DIR  # write them somewhere else

Writes ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` (prompt/completion) and
``chat/train.jsonl``, ``chat/valid.jsonl`` (the same task as chat ``messages``).
Running it again gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 20240611

# The closed label set. Each is a single token (with its leading space) in the
# SmolLM2 / GPT-2 style BPE vocabularies, and no two share a first token.
LABELS = ("work", "health", "family", "money", "hobby", "home")

# Notes per category in each split (6 categories, so 420 / 102 / 60 records).
SIZES = {"train": 70, "valid": 17, "test": 10}
CHAT_SIZES = {"train": 7, "valid": 2}  # 42 / 12 chat records
MAX_PER_TEMPLATE = 5  # realizations of one template, over all splits

PROMPT = "Note from Maya's journal: {note}\nCategory:"
CHAT_SYSTEM = (
    "You sort the notes of Maya's journal into exactly one category: "
    "work, health, family, money, hobby or home. Answer with the category only."
)

# --------------------------------------------------------------------------- vocabulary

# Dates and times: a note that differs from another only in these is the same note.
TEMPORAL = {
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
    "when": ["tonight", "tomorrow", "on Saturday", "next week", "first thing Monday", "this weekend"],
    "past_when": ["this morning", "yesterday", "on Saturday", "at lunch", "before dinner"],
    "time": ["8:30", "9", "10:15", "noon", "1:30", "3", "4:45", "6"],
    "pickup_time": ["3:15", "4", "5:30"],
    "time2": ["noon", "2", "4"],
    "month": ["January", "March", "April", "May", "June", "September", "October", "November"],
    "date": ["June 14", "the 22nd", "next Saturday", "the 3rd"],
    "dom": [str(d) for d in range(1, 29)],
}

COMMON = {"n": ["two", "three", "four", "five", "six"]}

VOCAB = {
    "work": {
        "project": [
            "the Alder Elementary schoolyard", "Riverside Commons", "the Foster Road plaza",
            "the library rain garden", "the Lents park playground", "the Division Street streetscape",
        ],
        "client": ["the parks bureau", "the school district", "the co-op board", "the library foundation"],
        "colleague": ["Jonah", "Mei"],
        "feature": [
            "bioswale", "boulder seating", "pergola", "meadow planting", "terraced steps",
            "splash pad", "rain garden", "shade trees",
        ],
        "deliverable": [
            "planting schedule", "grading plan", "detail sheets", "irrigation layout",
            "quantity takeoff", "site survey notes", "planting plan",
        ],
        "topic": ["tree protection", "ADA ramp", "stormwater", "lighting", "fire access", "root zone"],
        "plant": ["vine maples", "sword ferns", "red-flowering currants", "Oregon grape", "camas bulbs", "serviceberries"],
        "hours": ["six", "eight", "ten", "twelve"],
        "site_gear": [
            "the tape measure and the soil probe", "the camera and the base plans",
            "boots and a hard hat", "the measuring wheel",
        ],
        "trees": [
            "two of the old oaks have to stay", "the big cedar has root rot",
            "the street trees need pruning before construction",
        ],
        "product": ["permeable pavers", "green roof trays", "drip irrigation controllers", "recycled-plastic benches"],
        "board": ["concept boards", "comment cards", "site model photos"],
        "corner": ["northeast corner", "curb line", "entry gate"],
    },
    "health": {
        "km": ["4", "5", "6", "7", "8", "10"],
        "knee": [
            "left knee held up fine", "knee ached on the last hill", "no knee pain at all",
            "knee was stiff for the first kilometer",
        ],
        "exercise": ["step-downs", "wall sits", "clamshells", "single-leg bridges", "calf raises"],
        "reps": ["ten", "twelve", "fifteen", "twenty"],
        "stairs": [
            "the stairs at the transit station", "the long staircase up to the library",
            "hiking down Mount Tabor", "a steep walk in Forest Park",
        ],
        "hours": ["five", "five and a half", "six", "four"],
        "sleep_fix": [
            "The phone stays out of the bedroom from tonight", "Lights out by 10 tonight, no exceptions",
            "Try the magnesium Dr. Okafor suggested", "No more news after dinner",
        ],
        "allergy_action": [
            "took an antihistamine before walking Pepper", "my eyes are puffy and itchy",
            "keep the windows shut and rinse the sinuses",
        ],
        "dental": [
            "ask about the sensitive molar", "floss every night until then, seriously", "they want X-rays this time",
        ],
        "event": ["the potluck", "the birthday party", "the team lunch", "the wedding"],
        "level": ["low", "borderline low", "back to normal", "slightly low"],
        "yoga": [
            "hips are finally loosening up", "my lower back feels so much better",
            "held the balance poses longer than ever", "my shoulders stopped aching",
        ],
        "trigger_past": ["skipped lunch", "stared at screens all day", "slept badly", "forgot to drink water"],
        "shot": ["Flu shot", "COVID booster", "Tetanus booster"],
        "glasses": ["two", "three", "four"],
        "water": ["no wonder the headache", "keep the bottle filled", "set a reminder every two hours"],
        "eyes": [
            "my prescription has probably changed", "screens are blurry by evening", "ask about my dry eyes",
        ],
        "reason": ["my calf was tight", "it was pouring", "I slept badly", "my throat was scratchy"],
        "alt_exercise": ["A long walk with Pepper", "Twenty minutes on the bike trainer", "A gentle yoga video"],
        "therapy": [
            "talk about the trouble sleeping", "keep practicing the breathing exercise", "bring the anxiety log",
        ],
        "bpm": ["58", "61", "63", "64"],
        "symptom": ["Sneezing", "Runny nose", "Scratchy throat and sneezing"],
        "physical": ["fast the night before", "ask about the knee", "bring the list of supplements"],
        "stretch_min": ["Ten", "Fifteen", "Five"],
        "tea": ["rooibos", "chamomile", "decaf"],
        "muscle": ["Hamstring", "Left calf", "IT band", "Right hip"],
        "bp": ["118 over 76", "122 over 80", "115 over 72"],
        "sore": ["a sore throat", "a stuffy nose", "a low fever"],
        "remedy": ["gargle salt water and go to bed early", "honey tea and an early night", "cancel plans and rest"],
        "bedtime": ["10", "9:30", "10:30"],
        "laps": ["twenty", "thirty", "forty"],
        "swim": ["shoulders feel great", "my breathing is getting easier", "the knee didn't complain at all"],
        "med_min": ["five", "ten", "fifteen"],
        "allergy_q": ["allergy shots", "the new nasal spray", "testing for tree pollen"],
        "steps": ["12,000", "9,500", "15,000"],
        "pt_progress": ["getting stronger", "still a bit inflamed", "ready for hills again"],
    },
    "family": {
        "school_event": ["spring concert", "science fair", "class play", "art night", "book fair"],
        "holiday": ["Thanksgiving", "the summer visit", "Dad's birthday dinner", "the holidays"],
        "anniv": ["book a table at the Thai place", "plan a day trip to the coast", "find a sitter for Leo"],
        "tooth": ["another tooth", "a front tooth", "his first molar"],
        "meal": ["breakfast", "school", "dinner"],
        "visit_plan": ["Leo can't wait", "set up the bunk beds", "plan a zoo day for the cousins"],
        "dino": ["Microraptor", "Velociraptor", "Archaeopteryx", "Yutyrannus"],
        "team": ["Green Hornets", "Tigers", "Blue Comets", "Sharks"],
        "snack": ["orange slices", "granola bars", "watermelon"],
        "age": ["sixty-eight", "seventy", "seventy-two"],
        "dad_gift": ["new fishing rod", "weekend at the coast", "photo album"],
        "conf": [
            "he is reading above grade level", "he needs help with subtraction",
            "he is very kind to the new kid in class",
        ],
        "shifts": ["three", "four"],
        "sam_help": [
            "Leo and I will keep the morning quiet", "I'll handle bedtime all week",
            "Leo made them a get-well card anyway",
        ],
        "twins_age": ["five", "six", "seven"],
        "twin_gift": ["something with dinosaurs", "a volcano kit", "his old Lego sets"],
        "nightmare": ["sharks", "a giant spider", "being late for school"],
        "inlaws": [
            "Ray will want to talk baseball with Leo", "Gloria is bringing her flan", "ask them about their cruise",
        ],
        "pickup": ["the after-school program", "swim lessons", "his friend Omar's", "the library"],
        "thing": ["Lego volcano", "new loose tooth", "rock collection", "drawing of Pepper"],
        "sitter": ["the neighbors' teenager", "Grandma Gloria", "our friend Tessa"],
        "kids": ["twelve", "fifteen", "all twenty-two", "eighteen"],
        "dish2": ["stuffing", "pies", "mashed potatoes"],
        "trip": ["the zoo", "the science museum", "the aquarium", "the pumpkin patch"],
        "parenting": ["screen time", "bedtime", "sleepovers", "when Leo gets a phone"],
        "photo_place": ["the beach", "the zoo", "Mom's birthday"],
        "book_kid": ["a whole chapter book", "his first comic", "a poem he wrote"],
        "dino_shape": ["a Stegosaurus", "a T. rex", "Pepper"],
        "skill": ["ride without training wheels", "tie his shoes", "swim across the pool"],
        "daniel_news": [
            "the twins start kindergarten in the fall", "he's thinking about moving closer to Mom",
            "he and Priscilla are engaged",
        ],
        "leo_activity": ["played catch at the park", "read comics at the library", "biked to the ice cream shop"],
        "surprise": ["breakfast in bed", "picnic", "scavenger hunt"],
        "worry": ["the swim test", "the new school year", "his first sleepover"],
    },
    "money": {
        "amt": ["150", "200", "250", "300", "400", "500", "600", "750"],
        "small": ["9", "12", "15", "18"],
        "account": ["savings", "the emergency fund", "the vacation fund"],
        "bill_reason": ["the car repair", "the plane tickets", "Leo's new bike", "the vet visit", "the new laptop"],
        "form": ["mileage deduction", "estimated payments", "1099 from the side job", "charitable receipts"],
        "service": ["streaming", "meal-kit", "music", "cloud storage", "magazine"],
        "months": ["three", "four", "four and a half", "five"],
        "over": ["groceries", "gas", "clothes"],
        "under": ["restaurants", "gifts", "travel"],
        "insurance": ["Car insurance", "Life insurance", "Umbrella insurance"],
        "pct": ["8", "10", "12", "15"],
        "debt": ["the car loan", "the credit card", "the vacation fund"],
        "merchant": ["an online electronics store", "a gas station in Idaho", "a hotel in Denver", "a streaming service"],
        "splurge": ["takeout", "coffee shops", "online shopping"],
        "rate": ["4.1", "4.3", "4.5"],
        "reimb": ["dependent-care", "FSA", "travel"],
        "payments": ["eight", "eleven", "fourteen", "nineteen"],
        "item": ["coffee", "eggs", "car insurance", "daycare", "gas"],
        "taxdoc": ["W-2 and the 1099", "mortgage interest statement", "brokerage tax forms"],
        "networth": [
            "up a little despite the market", "flat, but the debt is shrinking", "down a bit after the car repair",
        ],
        "charity": ["the food bank drive", "the animal shelter", "public radio"],
        "acct_type": ["brokerage", "checking", "credit card"],
        "bill": ["water", "internet", "phone", "car insurance"],
        "score": ["742", "768", "781"],
        "sold": ["old bike trailer", "spare desk", "old stroller"],
        "owe": ["500", "800", "1,200"],
    },
    "hobby": {
        "bowls": ["four", "five", "six", "seven"],
        "pottery_note": [
            "Centering is still my weak spot", "The walls are finally even", "Pulling up the walls is getting easier",
        ],
        "result": ["mostly fine", "better than expected", "a mixed bag", "disappointing"],
        "glaze": ["celadon", "tenmoku", "shino", "speckled blue", "iron red"],
        "bird": [
            "belted kingfisher", "green heron", "cedar waxwing", "pileated woodpecker", "red-tailed hawk", "bald eagle",
        ],
        "birding_spot": ["Oaks Bottom", "Sauvie Island", "the Smith and Bybee wetlands"],
        "bird_pl": ["cedar waxwings", "buffleheads", "coots"],
        "piece": ["Satie's first Gymnopedie", "a Chopin nocturne", "the Bach minuet in G", "Clair de lune"],
        "minutes": ["twenty", "thirty", "forty", "forty-five"],
        "bar": ["12", "16", "24", "31"],
        "subject": ["the Sellwood Bridge", "the heron at the lake", "Mount Hood", "the pear tree", "the Tillamook coast"],
        "wc_problem": ["too much water in the sky", "the greens went muddy", "the paper buckled"],
        "rating": ["1240", "1275", "1310", "1350"],
        "opening": ["London System", "Caro-Kann", "Italian Game", "Queen's Gambit"],
        "supply": ["cold-press watercolor paper", "a size 8 round brush", "trimming tools", "glaze test tiles"],
        "pot": ["mug", "pitcher", "teacup"],
        "piano_goal": ["have the scales clean by then", "bring the new sheet music", "ask about the pedaling"],
        "place": ["the Japanese garden", "the riverfront", "the coffee shop on Tacoma Street", "the rose garden"],
        "theme": ["bridges", "trees in winter", "people in motion", "doorways"],
        "count": ["eleven", "fourteen", "twenty", "thirty-two"],
        "studio_task": [
            "reclaim the clay and wedge it for next week", "glaze the bisqued bowls", "trim last week's cylinders",
        ],
        "cadence": ["every day", "every lunch break", "of every place I visit"],
        "book": ["The Overstory", "Piranesi", "The Remains of the Day", "Station Eleven"],
        "book_reaction": ["it made me cry on the bus", "the ending was a letdown", "can't wait to discuss it"],
        "metronome": ["72", "80", "88", "96"],
        "streak": ["twelve", "thirty", "forty-one", "fifty"],
        "tc": ["blitz", "rapid"],
        "opponent": ["my old college roommate", "a player from Norway", "a twelve-year-old prodigy"],
        "chess_result": ["won with a sneaky fork", "blundered my queen", "drew a long endgame"],
        "gear": ["pair of binoculars", "spotting scope", "field guide to western birds"],
        "technique": ["carving a leaf pattern", "a wax-resist design", "slip trailing"],
        "tech_result": ["I love how it turned out", "it cracked in the bisque firing", "the lines came out wobbly"],
        "sketch_subj": ["the barista", "people waiting for the bus", "the rainy window"],
    },
    "home": {
        "fixture": ["Kitchen faucet", "Bathroom sink", "Shower head"],
        "filter_months": ["three", "four", "five"],
        "loads": ["three", "four", "five"],
        "laundry_extra": ["Pepper's bed cover", "the duvet", "the couch throw"],
        "room": ["hallway", "guest room", "kitchen", "mudroom", "upstairs bathroom", "bedroom"],
        "vac_place": ["the stairs", "the rug", "under the couch"],
        "groceries": [
            "oat milk, rice, lemons, dish soap", "bread, spinach, tofu, paper towels",
            "apples, pasta, oat milk, trash bags", "eggs, onions, coffee, sponges",
        ],
        "dw_fix": ["check the door seal", "clean the filter", "call the repair shop"],
        "color": ["sage green", "warm white", "pale blue", "a soft gray"],
        "problem": ["slow drain in the tub", "leak under the kitchen sink", "running toilet", "low water pressure"],
        "fan_fix": ["tighten the housing", "order a replacement motor", "clean the dust off the blades"],
        "furniture": ["couch", "reading chair", "desk"],
        "appliance": ["fridge", "pantry", "freezer"],
        "lawn": ["front lawn", "back lawn", "strip by the sidewalk"],
        "door": ["back", "pantry", "bedroom", "bathroom"],
        "light": ["Porch light", "Hallway light", "The lamp over the stove"],
        "bulbs": ["two", "three", "four"],
        "dish": ["lentil soup", "black bean chili", "vegetable curry", "minestrone"],
        "garage_item": ["bikes", "camping gear", "recycling bins"],
        "descale": ["kettle and the coffee maker", "shower head", "electric kettle"],
        "hang": ["shelves", "mirror", "coat hooks"],
        "bath": ["upstairs bathroom", "downstairs bathroom"],
        "outdoor": ["deck", "front steps", "driveway"],
        "season": ["summer", "winter"],
        "entry": ["front door", "back door"],
    },
}

TEMPLATES = {
    "work": [
        "Priya wants the revised {deliverable} for {project} by {weekday}.",
        "Site visit at {project} {when}; bring {site_gear}.",
        "Call with {client} about {project} moved to {time} on {weekday}.",
        "{colleague} found a conflict between the {feature} and the utility easement in the drawings for {project}.",
        "Need to redo the {deliverable} for {project} before the permit submittal.",
        "Presented three concepts for {project} today; {client} liked the one with the {feature}.",
        "The city reviewer sent comments on {project}: {n} items, mostly about {topic}.",
        "Stayed late at the studio to finish the {deliverable} for {project}.",
        "{colleague} is out {weekday}, so I'm covering the {deliverable} review for {project}.",
        "Scope on {project} got cut, so we lose the {feature}.",
        "Timesheets are due {weekday} and I still haven't logged my hours on {project}.",
        "Marked up the {deliverable} for {project} on the train in.",
        "The nursery says the {plant} for {project} won't ship until {month}.",
        "Staff meeting ran long again; Priya wants a short status note on {project} by {weekday}.",
        "The contractor put the {feature} in the wrong spot at {project}; meeting on site {weekday} at {time}.",
        "Annual review with Priya on {weekday}: she hinted I could lead {project} next year.",
        "Writing the specs for the {feature} at {project}; need product sheets from the supplier.",
        "Email {client} about the {topic} questions on {project}.",
        "Print two sets of drawings for {project} before the coordination meeting with {client}.",
        "My license renewal still needs {hours} continuing-education hours before {month}.",
        "Walked {project} with the arborist; {trees}.",
        "The submittal deadline for {project} moved up to {weekday}. Clear the calendar.",
        "{client} asked for a cheaper alternative to the {feature}; price out options with {colleague}.",
        "{colleague} and I are co-presenting {project} to {client} in {month}.",
        "Back-to-back meetings until {time}, then drawing markups for {project}.",
        "Had to tell {client} that the {feature} won't meet the {topic} rules.",
        "Renderings for {project} came back from the visualization consultant; the {feature} looks great.",
        "Ask {colleague} to check the plant counts in the {deliverable} for {project}.",
        "Lunch-and-learn at the studio on {weekday}: a rep is presenting {product}.",
        "Two hours on hold with the permit office about {project}. Nothing resolved.",
        "Hand off the {deliverable} for {project} to {colleague} before my day off.",
        "Public open house for {project} on {weekday} evening; print the {board}.",
        "The surveyor's base map for {project} is off by a few feet at the {corner}.",
        "Priya loved the {feature} detail I drew for {project}.",
    ],
    "health": [
        "Ran {km} km on the Springwater trail {past_when}; {knee}.",
        "Physio on {day} at {time}: keep doing the {exercise}, three sets of {reps}.",
        "Knee was sore after {stairs}. Ice it tonight.",
        "Slept {hours} hours again. {sleep_fix}.",
        "Pollen count is brutal; {allergy_action}.",
        "Dentist cleaning on {day} at {time}; {dental}.",
        "No dairy at {event}; my stomach paid for it last time.",
        "Blood test came back: iron is {level}. Dr. Okafor wants to recheck in {n} weeks.",
        "{day} yoga felt great; {yoga}.",
        "Migraine started around {time}, probably because I {trigger_past}. Lay down in the dark for an hour.",
        "{shot} at the pharmacy on {day}.",
        "Drank only {glasses} glasses of water today; {water}.",
        "Eye exam on {day}; {eyes}.",
        "Skipped the {weekday} run because {reason}. {alt_exercise} instead.",
        "Therapy session on {day} at {time}; {therapy}.",
        "Resting heart rate is down to {bpm} since I started running again.",
        "{symptom} all morning. Allergies or a cold? Taking it easy.",
        "Booked a physical with Dr. Okafor for {month}; {physical}.",
        "{stretch_min} minutes of stretching before bed really helps; do it again tonight.",
        "Coffee after {time} wrecks my sleep. Switching to {tea} in the afternoon.",
        "{muscle} was tight on the {km} km run; foam roll it later.",
        "Blood pressure at the clinic was {bp}, which is fine.",
        "Knee brace helped on the {km} km loop {past_when}.",
        "Woke up with {sore}; {remedy}.",
        "Went to bed at {bedtime} every night this week and I feel like a new person.",
        "Swam {laps} laps at the community pool {past_when}; {swim}.",
        "Lactose pills in my bag before {event}.",
        "Meditated for {med_min} minutes and my heart finally stopped racing.",
        "Allergist appointment on {day}: ask about {allergy_q}.",
        "Walked {steps} steps today, most of them with Pepper.",
        "The physical therapist says the knee is {pt_progress}.",
        "Sunscreen before the {km} km run on {day}; I got burned last week.",
    ],
    "family": [
        "Leo's {school_event} is on {day} at {time}; Sam can't get off shift, so I'll go.",
        "Call Mom in Eugene {when}; she wants to plan {holiday}.",
        "Sam and I have our anniversary on {date}; {anniv}.",
        "Leo lost {tooth} at {meal}. Tooth fairy duty tonight.",
        "Daniel is driving down from Seattle with the twins {when}; {visit_plan}.",
        "Leo asked why dinosaurs had feathers, so we read about {dino} before bed.",
        "Soccer on Saturday: Leo's team plays the {team} at {time}, and it's my turn to bring {snack}.",
        "Dad turns {age} next month; Daniel and I should go in on a {dad_gift} for him.",
        "Conference with Leo's teacher on {day}: {conf}.",
        "Sam did {shifts} night shifts in a row; {sam_help}.",
        "Ada and Finn turn {twins_age} in {month}; Leo insists we send them {twin_gift}.",
        "Leo had a nightmare about {nightmare} and ended up in our bed again.",
        "Sam's parents, Gloria and Ray, are coming for dinner on {day}; {inlaws}.",
        "Pick up Leo from {pickup} at {pickup_time}; Sam has the car.",
        "Video call with Mom and Dad on {day}; Leo wants to show them his {thing}.",
        "Date night with Sam on {day}; {sitter} is watching Leo.",
        "Leo wants to invite {kids} kids from his class to his birthday party. Still negotiating.",
        "Thanksgiving is at Daniel's this year, and Sam is making the {dish2}.",
        "Leo's class trip to {trip} needs a signed permission slip by {day}.",
        "Sam and I disagreed about {parenting} for Leo; talk again calmly this weekend.",
        "Send Daniel the photos of Leo and the twins from {photo_place}.",
        "Leo read {book_kid} to Mom over the phone; she was so proud of him.",
        "Leo and Sam made pancakes shaped like {dino_shape} this morning.",
        "Mom's visit is {when}; make up the guest bed and plan something fun with Leo.",
        "Leo asked if Grandpa Lars can come to his {school_event}.",
        "Sam and I walked Leo to school together for once; he held both our hands.",
        "Leo learned to {skill}; Sam filmed it for the grandparents.",
        "Daniel called: {daniel_news}.",
        "Leo and I {leo_activity} after school; best part of my week.",
        "Sam's birthday is {date}; Leo and I are planning a surprise {surprise}.",
        "Leo is nervous about {worry}; talk it through at bedtime.",
    ],
    "money": [
        "Paycheck landed; moved ${amt} into {account}.",
        "Credit card bill is ${amt} this month, higher than usual because of {bill_reason}.",
        "Quarterly estimated taxes due on the 15th. Ask the accountant about the {form}.",
        "Cancel the {service} subscription, we never use it: ${small} a month for nothing.",
        "Emergency fund covers {months} months of expenses now. The goal is six.",
        "Budget check: {over} over by ${small}0, {under} under by ${amt}.",
        "{insurance} renewal went up ${small}0; get quotes from two other companies.",
        "Raise my retirement contribution to {pct} percent starting with the next paycheck.",
        "Tax refund of ${amt} should arrive in {month}. Half goes toward {debt}.",
        "The bank flagged a ${amt} charge from {merchant}; I don't recognize it.",
        "Mortgage autopay failed this month; call the bank on {weekday}.",
        "Spent ${amt} on {splurge} in {month}. Way too much.",
        "Opened a high-yield savings account at {rate} percent.",
        "Index fund contribution of ${amt} went through.",
        "Reconcile the joint account with Sam before {weekday}.",
        "Check whether the ${amt} {reimb} reimbursement was paid out.",
        "Car loan: {payments} payments left.",
        "The price of {item} went up again; adjust the monthly budget.",
        "Student loan is finally paid off! Redirect that ${amt} a month into {account}.",
        "Download the {taxdoc} before we file the taxes in {month}.",
        "Net-worth spreadsheet updated for {month}: {networth}.",
        "Gave ${small}0 to {charity}; keep the receipt for taxes.",
        "Set up a recurring ${amt} transfer to {account} on payday.",
        "Our checking account dipped below ${amt}; no extra spending until payday.",
        "Compare the fees on the two {acct_type} accounts and close the pricier one.",
        "Paid the {bill} bill a week late and got a ${small} late fee. Set a reminder.",
        "Credit score is up to {score} after paying down the card.",
        "Ask the bank about refinancing the mortgage at {rate} percent.",
        "Sold the {sold} online for ${amt}; it goes straight into {account}.",
        "Started tracking every expense in the budget app; {n} days in.",
        "Tax withholding is too low this year; fix the W-4 before we owe ${owe}.",
    ],
    "hobby": [
        "Pottery class on {day}: threw {bowls} bowls and kept one. {pottery_note}.",
        "The glaze firing came out {result}; the {glaze} glaze ran onto the kiln shelf.",
        "Saw a {bird} at {birding_spot} this morning! Added it to my life list.",
        "Practiced {piece} for {minutes} minutes; the left hand is finally smooth in bar {bar}.",
        "My watercolor of {subject} didn't come out; {wc_problem}.",
        "Chess rating is up to {rating} after a good run with the {opening}.",
        "Order {supply} from the art store before the weekend.",
        "Audubon bird walk at {birding_spot} on {day}; bring the binoculars.",
        "Trimmed a {pot} on the wheel and attached a handle; it might actually be usable.",
        "Piano lesson with Mrs. Tan moved to {day}; {piano_goal}.",
        "Sketching group meets at {place} on {day}; the theme is {theme}.",
        "Counted {count} {bird_pl} at the lake for the winter bird count.",
        "Lost three chess games in a row with the {opening}; study endgames instead.",
        "Open studio hours on {day}: {studio_task}.",
        "Picked out the first page of {piece} by ear.",
        "New sketchbook, new rule: one small drawing {cadence}.",
        "Signed up for the {month} raku firing at the clay studio.",
        "Heard a {bird} calling but couldn't spot it; recorded the call to check later.",
        "Finished {book} for book club; {book_reaction}.",
        "Painted {subject} from the photos of our coast trip; happy with the light.",
        "Metronome at {metronome} for the scales this week; push it faster next week.",
        "Chess puzzle streak is at {streak} days.",
        "Glazed {bowls} cups in {glaze}; they go in the kiln on {day}.",
        "Spent the afternoon at {place} with my sketchbook and a thermos.",
        "Memorized the middle section of {piece}; play it for Mrs. Tan on {day}.",
        "A {bird} landed ten feet from me on the trail; finally got a sharp photo.",
        "Played a {tc} game against {opponent} and {chess_result}.",
        "Bought a secondhand {gear} for birding.",
        "Tried {technique} on the vase; {tech_result}.",
        "Recital for adult piano students in {month}; I'm playing {piece}.",
        "Drew {sketch_subj} at the cafe in ink, quick and loose.",
    ],
    "home": [
        "{fixture} is dripping again; buy a new cartridge at the hardware store.",
        "Change the furnace filter, it's been {filter_months} months.",
        "Clean the gutters before the {month} rains.",
        "Laundry: {loads} loads, and {laundry_extra} needs a wash too.",
        "Smoke detector in the {room} is chirping; replace the battery.",
        "Vacuum {vac_place}, Pepper's fur is everywhere.",
        "Grocery list: {groceries}.",
        "The dishwasher left a puddle again; {dw_fix}.",
        "Repaint the {room} {color} this weekend; tape the trim first.",
        "Plumber is coming on {day} between {time} and {time2} about the {problem}.",
        "Recycling and compost go out {day} night.",
        "Bathroom fan is rattling; {fan_fix}.",
        "Rearranged the living room so the {furniture} faces the window.",
        "Deep clean the {appliance}; something in the back smells.",
        "Mow the {lawn} and rake the leaves by the porch.",
        "The {door} door squeaks; oil the hinges.",
        "Clear out the {room} closet and take a bag to Goodwill.",
        "{light} burned out; buy {bulbs} LED bulbs.",
        "Water heater is making a popping noise; flush the tank this weekend.",
        "Meal prep on {day}: a big pot of {dish} for the week.",
        "Sweep the garage and find a spot for the {garage_item}.",
        "Descale the {descale}.",
        "Hang the new {hang} in the {room}; find the stud finder first.",
        "Move the houseplants away from the drafty window in the {room}.",
        "Caulk around the tub in the {bath} before the mold comes back.",
        "Scrub the oven and wipe down the cabinets on {day}.",
        "Weatherstrip the {door} door before winter; the draft is awful.",
        "The {room} window sticks; sand the frame a little.",
        "Power washed the {outdoor}; it looks new.",
        "Swap the {season} clothes into the bins in the attic.",
        "Fill the cracks in the {room} ceiling before painting.",
        "New doormat and a hook for Pepper's leash by the {entry}.",
    ],
}

# The label words (and words containing them, like "workout") never appear in a
# note: the model has to infer the category from the content, not copy a word.
_BANNED = re.compile("|".join(LABELS), re.IGNORECASE)

# Date-style prefixes, used the same way for every category (no label signal).
PREFIXES = ["", "", "", "", "", "{day}: ", "{month} {dom}: "]

_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, slots: dict, rng: random.Random) -> tuple[str, tuple]:
    """Fill a template; return the text and the (slot, value) choices that are not dates/times."""
    chosen: list[tuple[str, str]] = []

    def sub(m: re.Match) -> str:
        value = rng.choice(slots[m.group(1)])
        if m.group(1) not in TEMPORAL:
            chosen.append((m.group(1), value))
        return value

    return _SLOT.sub(sub, template), tuple(chosen)


def make_notes(rng: random.Random, label: str, count: int, seen: set) -> list[str]:
    """``count`` distinct notes for ``label``, spread evenly over its templates.

    Two notes count as the same when they come from one template with the same
    non-date/time choices (a new weekday does not make a new note).
    """
    slots = {**TEMPORAL, **COMMON, **VOCAB[label]}
    templates = list(TEMPLATES[label])
    used = {t: 0 for t in templates}
    notes: list[str] = []
    while len(notes) < count:
        if not templates:
            raise RuntimeError(f"not enough distinct notes for {label!r}: add templates or vocabulary")
        rng.shuffle(templates)
        for template in list(templates):
            if len(notes) == count:
                break
            for _ in range(60):
                body, choices = _fill(template, slots, rng)
                key = (template, choices)
                if key not in seen:
                    break
            else:
                templates.remove(template)  # no fresh combination left
                continue
            body = body[0].upper() + body[1:]
            if _BANNED.search(body):
                raise AssertionError(f"label word in a {label} note: {body!r}")
            seen.add(key)
            used[template] += 1
            if used[template] >= MAX_PER_TEMPLATE:
                templates.remove(template)
            prefix, _ = _fill(rng.choice(PREFIXES), slots, rng)
            notes.append(prefix + body)
    return notes


def build(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set = set()  # every note's identity, across ALL splits
    parts: dict[str, dict[str, list[str]]] = {}
    plan = list(SIZES.items()) + [("chat/" + k, v) for k, v in CHAT_SIZES.items()]
    for label in LABELS:
        notes = make_notes(rng, label, sum(size for _, size in plan), seen)
        rng.shuffle(notes)
        parts[label], i = {}, 0
        for name, size in plan:
            parts[label][name] = notes[i : i + size]
            i += size

    out: dict[str, list[dict]] = {}
    for name, _ in plan:
        rows = [(note, label) for label in LABELS for note in parts[label][name]]
        rng.shuffle(rows)
        if name.startswith("chat/"):
            out[name] = [
                {
                    "messages": [
                        {"role": "system", "content": CHAT_SYSTEM},
                        {"role": "user", "content": note},
                        {"role": "assistant", "content": label},
                    ]
                }
                for note, label in rows
            ]
        else:
            out[name] = [{"prompt": PROMPT.format(note=note), "completion": " " + label} for note, label in rows]
    return out


def write(out_dir: Path, data: dict[str, list[dict]]) -> None:
    for name, records in data.items():
        path = out_dir / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=True) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    ap.add_argument("--seed", type=int, default=SEED, help="generator seed (changes the data)")
    args = ap.parse_args(argv)
    data = build(args.seed)
    write(args.out, data)
    sizes = ", ".join(f"{k}: {len(v)}" for k, v in data.items())
    print(f"wrote {args.out} ({sizes})")


if __name__ == "__main__":
    main()
